"""kvant.bench."""
