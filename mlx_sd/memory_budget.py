"""How much memory a generation needs, and the budget it is checked against before it starts.

The estimate is an upper bound on the working memory of one request beside the loaded weights,
from its width x height x batch_size (h = height/8 and w = width/8 latent cells, T = h*w tokens):

- latents: batch x 4 channels x T x 4 bytes (fp32) x LATENT_COPIES (the sampler's current,
  denoised and history latents);
- UNet attention: the score matrix of the largest self-attention, at full latent resolution:
  T^2 x heads x batch x 2 (conditional and unconditional passes) x itemsize;
- VAE decode: the full-resolution feature maps, height x width x channels x batch x itemsize x
  VAE_LIVE_MAPS, plus the mid-block's single-head attention, T^2 x batch x itemsize.

VAE_LIVE_MAPS is measured. With MLX's convolutions, which unfold each 3x3 convolution's input to
nine times its size, decoding peaked at 38-45 feature maps of the decoder's full-resolution width
(SD 1.x's VAE and the tiny test model, 128 to 512 pixels, MLX's CPU backend): the GPU figure,
unmeasured on Metal and likely generous there. The CPU computes convolutions as shifted GEMMs
without unfolding (mlx_sd.cpu.gemm) and peaks at 3.3-4.5 maps (SD 1.x's VAE at 256² and
512²). The terms are added although they peak at different times, so the bound stays safe.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from mlx_sd.errors import InvalidRequest, MemoryBudgetExceeded

LATENT_SCALE = 8  # pixels per latent cell in each direction
LATENT_CHANNELS = 4
LATENT_COPIES = 4
GUIDANCE_PASSES = 2  # classifier-free guidance runs the conditional and unconditional passes as one batch
# Full-resolution feature maps alive at the decoder's peak (measured, see above).
VAE_LIVE_MAPS = 48
VAE_LIVE_MAPS_CPU = 8
DEFAULT_BUDGET_FRACTION = 0.75  # of physical memory, where MLX does not recommend a working set
_GIB = 1024**3


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know of the model; the defaults are SD 1.x's."""

    attention_heads: int = 8  # in the UNet's first (full-resolution) attention level
    vae_full_resolution_channels: int = 256  # the widest feature map the VAE decoder holds at full size

    @classmethod
    def of(cls, unet_config: Any, vae_config: Any) -> ModelShape:
        """The shape of a loaded model, from its UNet and VAE configs (diffusers' field names)."""
        heads = unet_config.num_attention_heads or unet_config.attention_head_dim  # diffusers' SD-1 naming
        heads = heads[0] if isinstance(heads, (tuple, list)) else heads
        channels = vae_config.block_out_channels
        return cls(attention_heads=int(heads), vae_full_resolution_channels=int(channels[min(1, len(channels) - 1)]))


@dataclass(frozen=True)
class MemoryEstimate:
    latents: int
    unet_attention: int
    vae_decode: int

    @property
    def total(self) -> int:
        return self.latents + self.unet_attention + self.vae_decode


def estimate_request_bytes(width: int, height: int, batch_size: int, itemsize: int,
                           shape: ModelShape = ModelShape(), vae_live_maps: int = VAE_LIVE_MAPS) -> MemoryEstimate:
    """The working memory of generating `batch_size` images of `width` x `height` (see the module doc)."""
    tokens = (width // LATENT_SCALE) * (height // LATENT_SCALE)
    return MemoryEstimate(
        latents=batch_size * LATENT_CHANNELS * tokens * 4 * LATENT_COPIES,
        unet_attention=tokens**2 * shape.attention_heads * batch_size * GUIDANCE_PASSES * itemsize,
        vae_decode=batch_size * itemsize * (
            width * height * shape.vae_full_resolution_channels * vae_live_maps + tokens**2),
    )


def default_budget_bytes() -> int:
    """MLX's recommended working set on Metal; elsewhere DEFAULT_BUDGET_FRACTION of physical memory."""
    import mlx.core as mx  # deferred: the CLI parses --memory-budget without loading MLX

    recommended = mx.device_info().get("max_recommended_working_set_size")
    if recommended:
        return int(recommended)
    return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * DEFAULT_BUDGET_FRACTION)


def format_bytes(count: int) -> str:
    return f"{count / _GIB:.2f} GiB"


@dataclass(frozen=True)
class MemoryBudget:
    """The memory generation may use: the loaded weights plus one request's working memory."""

    limit: int

    def check(self, width: int, height: int, batch_size: int, itemsize: int, in_use: int,
              shape: ModelShape = ModelShape(), vae_live_maps: int = VAE_LIVE_MAPS) -> MemoryEstimate:
        """Raises before a request allocates anything when its estimate does not fit.

        InvalidRequest when it exceeds the whole budget (it could never run); MemoryBudgetExceeded
        when it does not fit beside the `in_use` bytes already held (the loaded model).
        """
        estimate = estimate_request_bytes(width, height, batch_size, itemsize, shape, vae_live_maps)
        needs = f"{width}x{height} with batch_size {batch_size} needs about {format_bytes(estimate.total)}"
        if estimate.total > self.limit:
            raise InvalidRequest("width x height x batch_size",
                                 f"{needs}, more than the memory budget of {format_bytes(self.limit)}")
        if estimate.total + in_use > self.limit:
            raise MemoryBudgetExceeded(f"{needs} beside the {format_bytes(in_use)} in use, more than the memory "
                                       f"budget of {format_bytes(self.limit)}")
        return estimate
