"""How much memory a generation needs, and the budget it is checked against before it starts.

The estimate is an upper bound on the working memory of one request beside the loaded weights,
from its width x height x batch_size (h = height/8 and w = width/8 latent cells, T = h*w tokens,
b = the activations' bytes per value: 2 for fp16 on Metal, 4 for fp32 on the CPU):

- latents: batch x 4 channels x T x 4 bytes (fp32) x LATENT_COPIES (the sampler's current,
  denoised and history latents);
- UNet attention: the score matrix of the largest self-attention, at the first level that has
  attention (full latent resolution for SD 1.x and 2.x; half for SDXL, T/4 tokens there):
  T^2 x heads x 2 (conditional and unconditional passes) x b, for one image: the UNet runs image by
  image (mlx_sd.sampling.denoisers.guided), and so does the VAE. SD 2.x's and SDXL's heads are
  64 wide, which the fused kernel takes, so on Metal this term overestimates theirs. On Metal MLX's fused
  attention kernel takes head widths 64, 80 and 128 only; SD 1.x's is 40, so MLX computes
  matmul-softmax-matmul and holds the whole matrix, counted once on the assumption that the
  softmax reuses the scores' buffer (MLX donates an input whose only reader is the op). The UNet's
  other activations (a few maps of 320 channels at T) are under a tenth of this term, left out;
- VAE decode: one image's full-resolution feature maps, height x width x C x b_vae x live maps,
  plus the mid-block's single-head attention (head width 512, unfused too), T^2 x b_vae,
  where b_vae is b except for SDXL's VAE upcast to fp32 (mlx_sd.engine.vae_precision): 4.

The live maps differ by device:
- Metal (VAE_LIVE_MAPS = 8, derived, not measured: no Mac runs the tests): MLX convolves 3x3
  layers whose channels are multiples of 32 with Winograd F(6x6, 3x3), whose input and output
  transforms each hold 64/36 = 1.8 maps beside the input and output; with the residual kept for
  the skip connection and the normalised input, a ResNet block at full resolution peaks at
  1 + 1 + 1.8 + 1.8 + 1 = 6.6 maps, rounded up to 8. No 3x3 convolution's input is unfolded.
- CPU (VAE_LIVE_MAPS_CPU = 8, measured): convolutions run as shifted GEMMs without unfolding
  (mlx_sd.cpu.gemm) and peak at 3.3-4.5 maps (SD 1.x's VAE at 256² and 512²).
The terms are added although they peak at different times, so the bound stays safe.

The budget: an explicit one (--memory-budget) is a hard limit. Metal's default is its recommended
working set, a soft limit: MLX may go past it (the GPU shares memory with the system), so a request
beyond it runs with a warning, and only one that cannot fit in physical memory is refused. On the
CPU the default is DEFAULT_BUDGET_FRACTION of physical memory, a hard limit.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from mlx_sd.engine.errors import InvalidRequest, MemoryBudgetExceeded

LATENT_SCALE = 8  # pixels per latent cell in each direction
LATENT_CHANNELS = 4
LATENT_COPIES = 4
GUIDANCE_PASSES = 2  # classifier-free guidance runs an image's conditional and unconditional passes as one batch
# Full-resolution feature maps alive at the decoder's peak (see the module doc): Metal, CPU.
VAE_LIVE_MAPS = 8
VAE_LIVE_MAPS_CPU = 8
DEFAULT_BUDGET_FRACTION = 0.75  # of physical memory, where MLX does not recommend a working set
_GIB = 1024**3

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know of the model; the defaults are SD 1.x's."""

    attention_heads: int = 8  # in the UNet's first level with attention
    vae_full_resolution_channels: int = 256  # the widest feature map the VAE decoder holds at full size
    attention_level: int = 0  # that level: its tokens are T / 4**level
    vae_itemsize: int | None = None  # bytes per VAE activation where not the other networks' (an upcast)

    @classmethod
    def of(cls, unet_config: Any, vae_config: Any, vae_itemsize: int | None = None) -> ModelShape:
        """The shape of a loaded model, from its UNet and VAE configs (diffusers' field names)."""
        heads = unet_config.num_attention_heads or unet_config.attention_head_dim  # diffusers' naming
        levels = len(unet_config.block_out_channels)
        heads = (heads,) * levels if isinstance(heads, int) else tuple(heads)
        level = next((i for i, kind in enumerate(unet_config.down_block_types) if kind.startswith("CrossAttn")), 0)
        channels = vae_config.block_out_channels
        return cls(attention_heads=int(heads[level]), vae_full_resolution_channels=int(channels[min(1, len(channels) - 1)]),
                   attention_level=level, vae_itemsize=vae_itemsize)


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
        unet_attention=(tokens // 4**shape.attention_level)**2 * shape.attention_heads * GUIDANCE_PASSES * itemsize,
        vae_decode=(shape.vae_itemsize or itemsize) * (
            width * height * shape.vae_full_resolution_channels * vae_live_maps + tokens**2),
    )


def physical_memory() -> int:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def default_budget() -> MemoryBudget:
    """Metal: its recommended working set, soft, under physical memory; elsewhere DEFAULT_BUDGET_FRACTION
    of physical memory, hard."""
    import mlx.core as mx  # deferred: the CLI parses --memory-budget without loading MLX

    info = mx.device_info()
    recommended = info.get("max_recommended_working_set_size")
    if recommended:
        return MemoryBudget(int(recommended), hard_limit=int(info.get("memory_size") or physical_memory()))
    return MemoryBudget(int(physical_memory() * DEFAULT_BUDGET_FRACTION))


def format_bytes(count: int) -> str:
    return f"{count / _GIB:.2f} GiB"


@dataclass(frozen=True)
class MemoryBudget:
    """The memory generation may use: the loaded weights plus one request's working memory.

    Without `hard_limit`, `limit` is refused beyond; with it (Metal's default), `limit` is only warned
    beyond and `hard_limit` (physical memory) is refused beyond.
    """

    limit: int
    hard_limit: int | None = None

    def check(self, width: int, height: int, batch_size: int, itemsize: int, in_use: int,
              shape: ModelShape = ModelShape(), vae_live_maps: int = VAE_LIVE_MAPS) -> MemoryEstimate:
        """Raises before a request allocates anything when its estimate does not fit.

        InvalidRequest when it exceeds the whole refusing limit (it could never run);
        MemoryBudgetExceeded when it does not fit beside the `in_use` bytes already held (the loaded
        model). Beyond a soft limit it logs a warning and lets the request run.
        """
        estimate = estimate_request_bytes(width, height, batch_size, itemsize, shape, vae_live_maps)
        needs = f"{width}x{height} with batch_size {batch_size} needs about {format_bytes(estimate.total)}"
        refusing, name = (self.limit, "memory budget") if self.hard_limit is None else (self.hard_limit,
                                                                                         "physical memory")
        if estimate.total > refusing:
            raise InvalidRequest("width x height x batch_size",
                                 f"{needs}, more than the {name} of {format_bytes(refusing)}")
        if estimate.total + in_use > refusing:
            raise MemoryBudgetExceeded(f"{needs} beside the {format_bytes(in_use)} in use, more than the {name} "
                                       f"of {format_bytes(refusing)}")
        if estimate.total + in_use > self.limit:
            log.warning("%s beside the %s in use, more than the recommended GPU working set of %s: it may swap",
                        needs, format_bytes(in_use), format_bytes(self.limit))
        return estimate
