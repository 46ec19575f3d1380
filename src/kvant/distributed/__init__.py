"""kvant.distributed."""
