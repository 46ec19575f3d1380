"""kvant.cluster."""
