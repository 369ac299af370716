"""app/gui."""
