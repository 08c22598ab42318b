"""Ours (MLX) against diffusers (torch) on the full-size random SDXL base checkpoint, in one run.

    nice .venv/bin/python benchmarks/run_sdxl.py [--stages ...] [--repeat 3] [--interleave] [--out FILE]

Needs `.cache/sdxl-random/` (`.venv-ref/bin/python benchmarks/build_sdxl_checkpoint.py`) and the
reference environment `.venv-ref`. The same harness as `run_sd15.py` (each (side, stage) in its own
subprocess, medians of --repeat after a warm-up, ratios = ours / diffusers' faster dtype). Stages:
`load_cold` (the single file converted as it loads; ours also `load_cached`, from our converted
cache), `text` (both text encoders on a CFG batch of 2), `unet512` and `unet1024` (one UNet step on
a CFG batch of 2 with the pooled embedding and size micro-conditioning), `vae1024` (one decode;
diffusers upcasts the VAE to fp32, as SDXL's overflows fp16; ours keeps bf16 weights and products with
fp32 activations), `e2e1024` (text + 20 Euler steps + decode). Peak RSS: the loads' peak for the load
stages; for the others, both sides hold only the networks the stage runs and count from after the
load (the networks held plus the stage's working memory).

diffusers' loads here convert one network at a time: its `from_single_file` reads the whole 6.9 GB
file into memory before converting, more than a shared 24 GB machine gives one process. Weights
are converted to the run's dtype as they are read. diffusers' default dtype here is bf16 only
(its fp32 UNet alone is 10 GB); pass --ref-dtypes float32,bfloat16 where memory allows.
"""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run_sd15 as sd15  # noqa: E402  (the harness: subprocesses, timing, the table)

REPO = sd15.REPO
ROOT = REPO / ".cache" / "sdxl-random"
SINGLE = ROOT / "stable-diffusion" / "model.safetensors"
FOLDER = ROOT / "diffusers"
STAGES = ("load_cold", "load_cached", "text", "unet512", "unet1024", "vae1024", "e2e1024")
# The networks each stage runs (the others: all of them).
NEEDS = {"text": ("text_encoder", "text_encoder_2"), "unet512": ("unet",), "unet1024": ("unet",), "vae1024": ("vae",)}
ALL = ("unet", "vae", "text_encoder", "text_encoder_2")
STEPS = 20
GUIDANCE = 5.0
TOKENS = 77
CONTEXT, POOLED = 2048, 1280  # ViT-L's 768 + bigG's 1280 hidden states; bigG's projected pooled output


def time_ids(size: int) -> list[float]:
    """SDXL base's micro-conditioning: original size, crop top-left, target size."""
    return [size, size, 0, 0, size, size]


def run_ours(stage: str, repeat: int, cache_dir: Path, dtype: str) -> dict:
    from mlx_sd.cpu.runtime import configure

    blas = configure()
    import mlx.core as mx

    from convert import load_networks
    from mlx_sd.cpu.runtime import release_memory
    from mlx_sd.engine.backends import from_environment

    backend = from_environment()
    start = time.perf_counter()
    cache = cache_dir if stage != "load_cold" else None
    models = backend.prepare_models(load_networks(SINGLE, dtype=dtype, cache_dir=cache, reader=backend.reader))
    mx.eval([network.parameters() for network in models.networks().values()])
    load_s = time.perf_counter() - start
    result: dict = {"blas": blas.name, "backend": backend.value, "dtype": dtype}
    if stage.startswith("load"):
        return result | {"times": [load_s], "peak_rss_gib": sd15.peak_rss_gib()}
    act = backend.activation_dtype(models.unet.conv_in.weight.dtype)
    for name in set(ALL) - set(NEEDS.get(stage, ALL)):  # hold what the stage runs, as diffusers' side does
        setattr(models, name, None)
    gc.collect()
    release_memory()
    result |= sd15.reset_peak_rss()
    key = mx.random.key(0)
    ids = mx.full((2, TOKENS), 49407, dtype=mx.int32)
    context = mx.random.normal((2, TOKENS, CONTEXT), key=key).astype(act)
    pooled = mx.random.normal((2, POOLED), key=key).astype(act)

    def text() -> tuple[mx.array, mx.array]:
        # hidden states before the last layer, as SDXL reads both encoders; bigG's pooled projection
        clip_l, _ = models.text_encoder.hidden_and_pooled(ids, pooled=False)
        big, pool = models.text_encoder_2.hidden_and_pooled(ids)
        return mx.concatenate([clip_l, big], axis=-1), pool

    def step(x: mx.array, t: float, cond: mx.array, pooled: mx.array, size: int) -> mx.array:
        ids_ = mx.array([time_ids(size)] * 2, dtype=act)
        return models.unet(x.astype(act), mx.array([t, t]), cond.astype(act), pooled.astype(act), ids_)

    def decode(latents: mx.array) -> mx.array:  # fp32: SDXL's VAE overflows fp16
        return models.vae.decode(latents.astype(mx.float32) / models.vae.config.scaling_factor)

    if stage == "text":
        fn: Callable[[], object] = lambda: mx.eval(text())  # noqa: E731
    elif stage in ("unet512", "unet1024"):
        size = int(stage[4:])
        latents = mx.random.normal((2, size // 8, size // 8, 4), key=key)
        fn = lambda: mx.eval(step(latents, 500.0, context, pooled, size))  # noqa: E731
    elif stage == "vae1024":
        latents = mx.random.normal((1, 128, 128, 4), key=key)
        fn = lambda: mx.eval(decode(latents))  # noqa: E731
    else:
        sigmas, timesteps = sd15.euler_sigmas(STEPS)

        def e2e() -> None:
            cond, pool = text()
            x = mx.random.normal((1, 128, 128, 4), key=key) * sigmas[0]
            for i, t in enumerate(timesteps):
                scaled = mx.concatenate([x, x]) / (sigmas[i] ** 2 + 1) ** 0.5
                eps_u, eps_c = mx.split(step(scaled, t, cond, pool, 1024).astype(mx.float32), 2)
                x = x + (eps_u + GUIDANCE * (eps_c - eps_u)) * (sigmas[i + 1] - sigmas[i])
                mx.eval(x)
            mx.eval(decode(x))

        return result | {"times": [sd15._once(e2e)], "peak_rss_gib": sd15.peak_rss_gib()}
    return result | {"times": sd15.timed(fn, repeat), "peak_rss_gib": sd15.peak_rss_gib()}


def _diffusers_networks(names: tuple[str, ...], torch_dtype: object, single: Path = SINGLE) -> dict:
    """SDXL base's networks from the single file, one network's tensors in memory at a time."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu
    from safetensors import safe_open
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    prefixes = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
                "text_encoder": "conditioner.embedders.0.transformer.", "text_encoder_2": "conditioner.embedders.1.model."}
    out = {}
    with safe_open(single, framework="pt") as tensors:
        for name in names:
            state = {k: tensors.get_tensor(k).to(torch_dtype) for k in tensors.keys() if k.startswith(prefixes[name])}
            with torch.device("meta"):
                if name in ("unet", "vae"):
                    cls = UNet2DConditionModel if name == "unet" else AutoencoderKL
                    model = cls.from_config(cls.load_config(FOLDER / name))
                else:
                    cls = CLIPTextModel if name == "text_encoder" else CLIPTextModelWithProjection
                    model = cls(CLIPTextConfig.from_pretrained(FOLDER / name))
            if name == "unet":
                converted = sfu.convert_ldm_unet_checkpoint(state, model.config)
            elif name == "vae":
                converted = sfu.convert_ldm_vae_checkpoint(state, model.config)
            elif name == "text_encoder":
                converted = sfu.convert_ldm_clip_checkpoint(state)
                converted.pop("text_model.embeddings.position_ids")  # a non-persistent buffer there
            else:
                converted = sfu.convert_open_clip_checkpoint(model, state, prefix=prefixes[name])
            del state
            model.load_state_dict(converted, strict=True, assign=True)
            if name.startswith("text_encoder"):  # a non-persistent buffer: left on the meta device
                model.text_model.embeddings.position_ids = torch.arange(TOKENS).unsqueeze(0)
            out[name] = model.eval().requires_grad_(False)
    return out


def run_diffusers(stage: str, repeat: int, threads: int, dtype: str) -> dict:
    import torch

    torch.set_num_threads(threads)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    start = time.perf_counter()
    nets = _diffusers_networks(NEEDS.get(stage, ALL), torch_dtype)
    load_s = time.perf_counter() - start
    result: dict = {"dtype": dtype, "threads": threads}
    if stage.startswith("load"):
        return result | {"times": [load_s], "peak_rss_gib": sd15.peak_rss_gib()}
    gc.collect()
    result |= sd15.reset_peak_rss()
    if "vae" in nets:
        nets["vae"].to(torch.float32)  # as diffusers' SDXL pipelines (force_upcast)
    gen = torch.Generator().manual_seed(0)
    ids = torch.full((2, TOKENS), 49407, dtype=torch.long)
    context = torch.randn((2, TOKENS, CONTEXT), generator=gen).to(torch_dtype)
    pooled = torch.randn((2, POOLED), generator=gen).to(torch_dtype)

    def text() -> tuple[torch.Tensor, torch.Tensor]:
        clip_l = nets["text_encoder"](ids, output_hidden_states=True)
        big = nets["text_encoder_2"](ids, output_hidden_states=True)
        return torch.cat([clip_l.hidden_states[-2], big.hidden_states[-2]], dim=-1), big.text_embeds

    def step(x: torch.Tensor, t: float, cond: torch.Tensor, pool: torch.Tensor, size: int) -> torch.Tensor:
        added = {"text_embeds": pool, "time_ids": torch.tensor([time_ids(size)] * 2, dtype=torch_dtype)}
        return nets["unet"](x.to(torch_dtype), torch.tensor([t, t]), encoder_hidden_states=cond,
                            added_cond_kwargs=added).sample

    def decode(latents: torch.Tensor) -> torch.Tensor:
        return nets["vae"].decode(latents.float() / nets["vae"].config.scaling_factor).sample

    with torch.inference_mode():
        if stage == "text":
            fn: Callable[[], object] = text
        elif stage in ("unet512", "unet1024"):
            size = int(stage[4:])
            latents = torch.randn((2, 4, size // 8, size // 8), generator=gen)
            fn = lambda: step(latents, 500.0, context, pooled, size)  # noqa: E731
        elif stage == "vae1024":
            latents = torch.randn((1, 4, 128, 128), generator=gen)
            fn = lambda: decode(latents)  # noqa: E731
        else:
            sigmas, timesteps = sd15.euler_sigmas(STEPS)

            def e2e() -> None:
                cond, pool = text()
                x = torch.randn((1, 4, 128, 128), generator=gen) * sigmas[0]
                for i, t in enumerate(timesteps):
                    scaled = torch.cat([x, x]) / (sigmas[i] ** 2 + 1) ** 0.5
                    eps_u, eps_c = step(scaled, t, cond, pool, 1024).float().chunk(2)
                    x = x + (eps_u + GUIDANCE * (eps_c - eps_u)) * (sigmas[i + 1] - sigmas[i])
                decode(x)

            return result | {"times": [sd15._once(e2e)], "peak_rss_gib": sd15.peak_rss_gib()}
        return result | {"times": sd15.timed(fn, repeat), "peak_rss_gib": sd15.peak_rss_gib()}


SDXL = sd15.Benchmark("SDXL base", __doc__, __file__, STAGES, frozenset({"load_cached"}), run_ours, run_diffusers,
                         "sdxl-linux-cpu", ref_dtypes="bfloat16")

if __name__ == "__main__":
    sd15.main(SDXL)
