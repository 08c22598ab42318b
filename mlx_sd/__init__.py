"""Stable Diffusion in MLX."""

__version__ = "0.1.0"
