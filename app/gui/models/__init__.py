"""app/gui/models."""
