"""kvant.quant."""
