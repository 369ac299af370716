"""Subcommands of the `latent` CLI, one module each."""
