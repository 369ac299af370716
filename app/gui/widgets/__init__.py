"""Small reusable widgets: the error banner, the message composer, the sampling panel."""
