"""The frozen app's entry point: the same `latent` command as the installed console script.

PyInstaller freezes this file; it only hands over to `app.cli.main` (which, with no argument,
opens the desktop window).
"""

import sys

from app.cli import main

if __name__ == "__main__":
    sys.exit(main())
