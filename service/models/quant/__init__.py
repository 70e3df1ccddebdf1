"""Quantized weights: int8/int4 layers, our own CPU kernels, and the precision and kernel choices."""
