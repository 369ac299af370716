"""app/gui/views."""
