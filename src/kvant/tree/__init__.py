"""kvant.tree."""
