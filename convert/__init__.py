"""SD-1 checkpoints (single file, diffusers folder, standalone VAE) -> MLX models, with a converted cache."""

from convert.assemble import SD1Configs, SD1Models
from convert.loader import convert_checkpoint, load_sd1, resolve_dtype

__all__ = ["SD1Configs", "SD1Models", "convert_checkpoint", "load_sd1", "resolve_dtype"]
