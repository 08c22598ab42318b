"""Checkpoints of every family (single file, diffusers folder, standalone VAE) -> MLX models, with a converted cache."""

from convert.assemble import ModelNetworks, NetworkConfigs
from convert.loader import convert_checkpoint, load_networks, resolve_dtype

__all__ = ["ModelNetworks", "NetworkConfigs", "convert_checkpoint", "load_networks", "resolve_dtype"]
