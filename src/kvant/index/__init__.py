"""kvant.index."""
