"""engine/layers."""
