"""`mlx-sd bench`: this machine's speed and memory on SD 1.x, as a Markdown block to paste into an
issue (docs/operations.md says where). Made for Macs, which the project cannot measure itself.

It loads the model directory's default model as `serve` does, or, where there is none, builds a
random-weight full-size SD 1.5 in memory (the networks' default configs are SD 1.5's), and says
which. Per image side it measures:

- the UNet step with classifier-free guidance (batch 2), with the attention heads as they are and
  zero-padded to a size MLX's fused Metal kernel takes (`--pad-attention-heads`), each plain and
  `mx.compile`d: the median of `repeats` calls after a warm-up call (which traces and builds kernels);
- one whole image (text encoder, `steps` sampling steps, VAE decode) through the pipeline, both ways,
  after the UNet steps at its size (no warm-up image of its own);
- MLX's peak memory during each (reset before it);
- which attention calls Metal's fused kernel runs, with the heads as they are and padded
  (mlx_sd.models.fused_attention), from a forward pass over unevaluated networks of the model's
  configs, so that the table is the same on every device.

On the CPU backend (mlx_sd.cpu) its own attention runs and its layers cannot be traced, so those
rows say n/a; `MLX_SD_BACKEND=mlx` measures MLX's own ops, the Metal path, on the CPU.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from convert.assemble import ModelNetworks, NetworkConfigs
from convert.loader import resolve_dtype
from mlx_sd import __version__
from mlx_sd.engine.backends import Backend
from mlx_sd.engine.errors import ModelNotFound
from mlx_sd.engine.model_store import LoadedModel, ModelStore
from mlx_sd.engine.pipeline import LATENT_SCALE, Pipeline
from mlx_sd.engine.request import GenerationRequest
from mlx_sd.engine.tokenizer import default_tokenizer
from mlx_sd.models import fused_attention
from mlx_sd.models.clip import CLIPTextConfig, CLIPTextModel
from mlx_sd.models.fused_attention import AttentionCall
from mlx_sd.models.layers import pad_attention_heads
from mlx_sd.models.unet import UNet2DConditionModel, UNetConfig
from mlx_sd.models.vae import AutoencoderKL, VAEConfig

DEFAULT_SIZES = (512, 1024)
DEFAULT_STEPS = 20
DEFAULT_REPEATS = 3
QUICK_SIZES = (512,)
TIMESTEP = 500
PROMPT = "a lighthouse on a cliff at dusk, oil painting"
TITLE = "### mlx-sd bench"
HEADS = {False: "as they are", True: "padded"}
SD15 = NetworkConfigs(CLIPTextConfig(), UNetConfig(), VAEConfig())  # the networks' defaults are SD 1.5's


@dataclass(frozen=True)
class Row:
    """One measurement: `seconds` and `peak_bytes` are None where it did not run, `note` says why."""

    size: int
    stage: str
    padded: bool
    compiled: bool
    seconds: float | None = None
    peak_bytes: int | None = None
    note: str = ""


@dataclass(frozen=True)
class BenchModel:
    loaded: LoadedModel
    backend: Backend
    source: str  # which model was measured, in words


def load_model(models_dir: Path, dtype: str | None, backend: Backend, cache_dir: Path | None = None) -> BenchModel:
    """The model directory's default model, or a random-weight SD 1.5 where it has none."""
    store = ModelStore(models_dir, dtype=dtype, cache_dir=cache_dir, backend=backend)
    try:
        loaded = store.get()
        return BenchModel(loaded, backend, f"{loaded.name} (the default model of {models_dir})")
    except ModelNotFound:
        pass
    weights = resolve_dtype(dtype)
    models = ModelNetworks(CLIPTextModel(SD15.text_encoder), UNet2DConditionModel(SD15.unet), AutoencoderKL(SD15.vae))
    for network in (models.text_encoder, models.unet, models.vae):
        network.set_dtype(weights)
        mx.eval(network.parameters())
    models = backend.prepare_models(models)
    loaded = LoadedModel(models, default_tokenizer(), "random SD 1.5", "", backend.activation_dtype(weights))
    return BenchModel(loaded, backend, f"random-weight SD 1.5 built in memory (no model in {models_dir})")


class _Held:
    """What the pipeline asks of a model store, for a model already loaded."""

    def __init__(self, model: BenchModel, models_dir: Path) -> None:
        self.models_dir, self.backend, self._loaded = models_dir, model.backend, model.loaded

    def get(self, model: str = "") -> LoadedModel:
        return self._loaded


def _measure(size: int, stage: str, padded: bool, compiled: bool, run: Callable[[], object],
             repeats: int, warm_up: bool = True) -> Row:
    """`run`'s median time over `repeats` calls (after a warm-up call), and MLX's peak memory then."""
    try:
        if warm_up:
            mx.eval(run())
        mx.reset_peak_memory()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            mx.eval(run())
            times.append(time.perf_counter() - start)
        return Row(size, stage, padded, compiled, statistics.median(times), mx.get_peak_memory())
    except (RuntimeError, MemoryError) as exc:  # e.g. out of memory at the largest size
        return Row(size, stage, padded, compiled, note=f"failed: {exc}")
    finally:
        mx.clear_cache()


def measure(model: BenchModel, models_dir: Path, sizes: tuple[int, ...], steps: int, repeats: int,
            log: Callable[[str], None] = lambda _: None) -> list[Row]:
    """The UNet step and whole-image rows for each side in `sizes` (see the module's docstring)."""
    unet, configs = model.loaded.models.unet, model.loaded.models.configs
    dtype, on_cpu_kernels = model.loaded.activation_dtype, model.backend is Backend.CPU
    pipeline = Pipeline(_Held(model, models_dir))  # type: ignore[arg-type]
    step = "UNet step, CFG batch 2"
    image = f"image: text, {steps} steps, VAE"
    rows = []
    for size in sizes:
        side = size // LATENT_SCALE
        key = mx.random.key(0)
        latents = mx.random.normal((2, side, side, configs.unet.in_channels), key=key).astype(dtype)
        context = mx.random.normal((2, 77, configs.unet.cross_attention_dim), key=key).astype(dtype)
        timesteps = mx.array([TIMESTEP, TIMESTEP])
        request = GenerationRequest(prompt=PROMPT, width=size, height=size, steps=steps, seed=1).validated()
        for padded in (False, True):
            if padded and on_cpu_kernels:
                rows.append(Row(size, step, True, False, note="n/a: the CPU backend's attention does not pad"))
                continue
            _pad(model, padded)
            forward = lambda x, t, c: unet(x, t, c)  # noqa: E731  (one function per form, traced anew)
            for compiled in (False, True):
                if compiled and on_cpu_kernels:
                    rows.append(Row(size, step, padded, True, note="n/a: the CPU backend's layers cannot be traced"))
                    continue
                log(f"{size}²: UNet step, heads {HEADS[padded]}{', compiled' if compiled else ''}")
                fn = mx.compile(forward) if compiled else forward
                rows.append(_measure(size, step, padded, compiled, lambda: fn(latents, timesteps, context), repeats))
            log(f"{size}²: one image, heads {HEADS[padded]}")
            # The UNet steps before it warmed up its kernels at this size; one image is minutes at 1024².
            rows.append(_measure(size, image, padded, False, lambda: _image(pipeline, request), 1, warm_up=False))
        _pad(model, False)
    return rows


def _pad(model: BenchModel, enabled: bool) -> None:
    for network in (model.loaded.models.text_encoder, model.loaded.models.unet, model.loaded.models.vae):
        pad_attention_heads(network, enabled)


def _image(pipeline: Pipeline, request: GenerationRequest) -> mx.array:
    for _ in pipeline(request):  # the last item holds the pixels, already computed
        pass
    return mx.array(0)


def attention_calls(configs: NetworkConfigs, size: int) -> dict[str, Counter[AttentionCall]]:
    """The attention calls of each network for one image of side `size` (the UNet's with CFG's batch
    of 2), counted, from a forward pass over fresh networks that is never evaluated."""
    side = size // LATENT_SCALE
    calls: dict[str, Counter[AttentionCall]] = {}
    passes = {
        "text encoder": (lambda: CLIPTextModel(configs.text_encoder),
                         lambda m: m(mx.zeros((2, configs.text_encoder.max_position_embeddings), mx.int32))),
        "UNet": (lambda: UNet2DConditionModel(configs.unet),
                 lambda m: m(mx.zeros((2, side, side, configs.unet.in_channels)), mx.array([TIMESTEP] * 2),
                             mx.zeros((2, 77, configs.unet.cross_attention_dim)))),
        "VAE decoder": (lambda: AutoencoderKL(configs.vae),
                        lambda m: m.decode(mx.zeros((1, side, side, configs.vae.latent_channels)))),
    }
    for name, (build, forward) in passes.items():
        with fused_attention.recording() as recorded:
            forward(build())
        calls[name] = Counter(recorded)
    return calls


def machine() -> str:
    """The OS, the chip (Metal's device name on a Mac) and the memory."""
    info = mx.device_info()
    chip = info.get("device_name") or platform.processor() or platform.machine()
    memory = info.get("memory_size") or os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    mac = platform.mac_ver()[0]
    system = f"macOS {mac}" if mac else f"{platform.system()} {platform.release()}"
    return f"{system}, {chip}, {memory / 1024**3:.0f} GB"


def _gib(value: int | None) -> str:
    return "-" if value is None else f"{value / 1024**3:.2f} GiB"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def report(model: BenchModel, rows: list[Row], calls: dict[int, dict[str, Counter[AttentionCall]]],
           repeats: int) -> str:
    """The Markdown block: the setup, the measurements, and the attention table of each size."""
    weights = model.loaded.models.unet.conv_in.weight.dtype
    dtype = str(weights).removeprefix("mlx.core.")
    if model.loaded.activation_dtype != weights:
        dtype += f" weights, {str(model.loaded.activation_dtype).removeprefix('mlx.core.')} activations"
    device = mx.default_device()
    lines = [
        TITLE, "",
        "| setting | value |", "|---|---|",
        f"| machine | {machine()} |",
        f"| device | {device.type.name} |",
        f"| MLX | {mx.__version__} |",
        f"| mlx-sd | {__version__} |",
        f"| backend | {model.backend.value} |",
        f"| model | {model.source} |",
        f"| dtype | {dtype} |",
        f"| timing | UNet step: median of {repeats} after a warm-up call; image: one, after the steps |",
        "",
        "| size | measurement | attention heads | mx.compile | seconds | peak memory | note |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {r.size}² | {r.stage} | {HEADS[r.padded]} | {'yes' if r.compiled else 'no'} | "
              f"{_seconds(r.seconds)} | {_gib(r.peak_bytes)} | {r.note} |" for r in rows]
    where = "" if device.type == mx.DeviceType.gpu else " (this device never runs it: what Metal would do)"
    for size, networks in calls.items():
        lines += ["", f"Attention at {size}², MLX {mx.__version__}'s fused Metal kernel{where}:", "",
                  "| network | calls | batch × heads | queries × keys | head size | fused | padded: fused |",
                  "|---|---|---|---|---|---|---|"]
        for network, counted in networks.items():
            lines += [_attention_row(network, call, count) for call, count in counted.items()]
    return "\n".join(lines) + "\n"


def _attention_row(network: str, call: AttentionCall, count: int) -> str:
    reason = fused_attention.fallback_reason(call)
    padded = fused_attention.padded_head_dim(call)
    padded_cell = "(not padded)" if padded == call.head_dim else f"yes, {call.head_dim} → {padded}"
    mask = ", causal" if call.causal else ""
    return (f"| {network} | {count} | {call.batch} × {call.heads} | {call.queries} × {call.keys}{mask} | "
            f"{call.head_dim} | {'yes' if reason is None else 'no: ' + reason} | {padded_cell} |")


def bench(models_dir: Path, *, sizes: tuple[int, ...] = DEFAULT_SIZES, steps: int = DEFAULT_STEPS,
          dtype: str | None = None, repeats: int = DEFAULT_REPEATS, backend: Backend = Backend.MLX,
          cache_dir: Path | None = None, log: Callable[[str], None] = lambda _: None) -> str:
    """Measures and returns the Markdown block (see the module's docstring)."""
    for size in sizes:
        GenerationRequest(prompt=PROMPT, width=size, height=size, steps=steps).validated()  # InvalidRequest
    model = load_model(models_dir, dtype, backend, cache_dir)
    log(f"measuring {model.source}")
    rows = measure(model, models_dir, sizes, steps, repeats, log)
    calls = {size: attention_calls(model.loaded.models.configs, size) for size in sizes}
    return report(model, rows, calls, repeats)
