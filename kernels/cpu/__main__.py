"""`python -m latent_kernels.cpu [-v]`: build the CPU kernels now (make test does) and say where."""

import sys

from .extension import main

sys.exit(main())
