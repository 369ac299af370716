"""Latent Studio front ends: the desktop app (app.gui), the `latent` CLI and the local server."""

try:
    from importlib.metadata import version as _version

    __version__ = _version("latent-studio")
except Exception:  # running from a source tree that is not installed
    __version__ = "0.1.0"
