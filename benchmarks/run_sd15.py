"""Ours (MLX) against diffusers (torch) on the full-size random SD-1.5 checkpoint, in one run.

    nice .venv/bin/python benchmarks/run_sd15.py [--stages ...] [--repeat 3] [--out FILE]

Needs `.cache/sd15-random/` (`.venv-ref/bin/python benchmarks/build_sd15_checkpoint.py`) and
the reference environment `.venv-ref` (torch==2.13.0 CPU, diffusers). Every (side, stage)
runs in its own subprocess, so its peak RSS (`ru_maxrss`) is its own; torch uses
--threads threads. Times are medians of --repeat runs after one warm-up. A benchmark, not a
test: CI does not run it. Writes a Markdown table of times, peak RSS and ratios (ours /
diffusers' faster dtype) with the machine description.

Loads: `load_cold` converts the single file as it loads (both sides); `load_first` (ours only,
diffusers keeps no cache) is a server's first start: the same, then the converted cache written
to an empty folder; `load_cached` is every later start (ours: the converted cache; diffusers:
its own folder layout, `from_pretrained`).

End to end = text encoder (prompt + empty prompt) + 20 Euler steps of the UNet on a CFG
batch of 2 + VAE decode, written the same way on both sides (no scheduler or safety checker).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOT = REPO / ".cache" / "sd15-random"
SINGLE = ROOT / "stable-diffusion" / "model.safetensors"
FOLDER = ROOT / "diffusers"
OURS_PY, REF_PY = REPO / ".venv" / "bin" / "python", REPO / ".venv-ref" / "bin" / "python"
STAGES = ("load_cold", "load_first", "load_cached", "text", "unet256", "unet512", "vae512", "e2e512")
OURS_ONLY = {"load_first"}
STEPS = 20


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def rss_gib(field: str = "VmRSS") -> float:
    """The process's RSS now (`VmRSS`) or its high-water mark (`VmHWM`), from /proc (Linux)."""
    status = Path("/proc/self/status").read_text().splitlines()
    return next(int(line.split()[1]) for line in status if line.startswith(field + ":")) / 2**20


def reset_peak_rss() -> dict:
    """Count the peak RSS from now on (Linux resets its high-water mark through clear_refs; elsewhere
    the peak stays the process's). Returns the RSS held at this point, where /proc tells it, to
    report beside the peak: what a stage adds is the difference."""
    clear = Path("/proc/self/clear_refs")
    if not clear.exists():
        return {}
    clear.write_text("5")
    return {"held_rss_gib": rss_gib()}


# With --interleave each child waits for the parent's word before every run (warm-up included),
# so that the two sides' runs alternate instead of meeting different loads on a shared machine.
PACED = os.environ.get("RUN_SD15_PACED") == "1"


def _turn() -> None:
    """In a paced child: says it is ready, and waits until the parent says go."""
    if PACED:
        print("ready", flush=True)
        sys.stdin.readline()


def timed(fn: Callable[[], object], repeat: int) -> list[float]:
    _turn()
    fn()
    times = []
    for _ in range(repeat):
        _turn()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def euler_sigmas(steps: int) -> tuple[list[float], list[float]]:
    """SD's scaled-linear betas at `steps` evenly spaced timesteps, as k-diffusion sigmas (plus 0)."""
    import numpy as np

    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    sigmas = ((1 - np.cumprod(1 - betas)) / np.cumprod(1 - betas)) ** 0.5
    timesteps = np.linspace(999, 0, steps)
    return [*np.interp(timesteps, np.arange(1000), sigmas).tolist(), 0.0], timesteps.tolist()


def run_ours(stage: str, repeat: int, cache_dir: Path, dtype: str) -> dict:
    from mlx_sd.cpu.runtime import configure

    blas = configure()
    import mlx.core as mx

    from convert import load_networks
    from mlx_sd.engine.backends import from_environment

    backend = from_environment()
    if stage == "load_first":
        cache_dir = Path(tempfile.mkdtemp(dir=cache_dir))
    start = time.perf_counter()
    cache = cache_dir if stage != "load_cold" else None
    models = backend.prepare_models(load_networks(SINGLE, dtype=dtype, cache_dir=cache, reader=backend.reader))
    mx.eval(models.unet.parameters(), models.vae.parameters(), models.text_encoder.parameters())
    load_s = time.perf_counter() - start
    result: dict = {"blas": blas.name, "backend": backend.value, "dtype": dtype}
    if stage.startswith("load"):
        return result | {"times": [load_s], "peak_rss_gib": peak_rss_gib()}
    key = mx.random.key(0)
    ids = mx.full((2, 77), 49407, dtype=mx.int32)
    context = mx.random.normal((2, 77, 768), key=key)

    def unet(size: int) -> Callable[[], object]:
        latents = mx.random.normal((2, size // 8, size // 8, 4), key=key)
        return lambda: mx.eval(models.unet(latents, mx.array([500, 500]), context))

    if stage == "text":
        fn = lambda: mx.eval(models.text_encoder(ids))  # noqa: E731
    elif stage in ("unet256", "unet512"):
        fn = unet(int(stage[4:]))
    elif stage == "vae512":
        latents = mx.random.normal((1, 64, 64, 4), key=key)
        fn = lambda: mx.eval(models.vae.decode(latents))  # noqa: E731
    else:
        sigmas, timesteps = euler_sigmas(STEPS)

        def fn() -> None:
            cond = models.text_encoder(ids)
            x = mx.random.normal((1, 64, 64, 4), key=key) * sigmas[0]
            for i, t in enumerate(timesteps):
                scaled = mx.concatenate([x, x]) / (sigmas[i] ** 2 + 1) ** 0.5
                eps_u, eps_c = mx.split(models.unet(scaled, mx.array([t, t]), cond), 2)
                x = x + (eps_u + 7.5 * (eps_c - eps_u)) * (sigmas[i + 1] - sigmas[i])
                mx.eval(x)
            mx.eval(models.vae.decode(x / 0.18215))

        return result | {"times": [_once(fn)], "peak_rss_gib": peak_rss_gib()}
    return result | {"times": timed(fn, repeat), "peak_rss_gib": peak_rss_gib()}


def _once(fn: Callable[[], None]) -> float:
    _turn()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_diffusers(stage: str, repeat: int, threads: int, dtype: str) -> dict:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.set_num_threads(threads)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    start = time.perf_counter()
    if stage == "load_cold":  # convert the original single file on load
        common = dict(torch_dtype=torch_dtype, local_files_only=True)
        unet = UNet2DConditionModel.from_single_file(str(SINGLE), config=str(FOLDER / "unet"), **common)
        vae = AutoencoderKL.from_single_file(str(SINGLE), config=str(FOLDER / "vae"), **common)
        text = CLIPTextModel.from_pretrained(FOLDER / "text_encoder", torch_dtype=torch_dtype)
    else:
        unet = UNet2DConditionModel.from_pretrained(FOLDER / "unet", torch_dtype=torch_dtype)
        vae = AutoencoderKL.from_pretrained(FOLDER / "vae", torch_dtype=torch_dtype)
        text = CLIPTextModel.from_pretrained(FOLDER / "text_encoder", torch_dtype=torch_dtype)
    load_s = time.perf_counter() - start
    result: dict = {"dtype": dtype, "threads": threads}
    if stage.startswith("load"):
        result |= {"times": [load_s], "peak_rss_gib": peak_rss_gib()}
        # Weights that need no conversion stay mapped from the file until first used: read one
        # value from every 4 KiB page, as a first forward would, to time mapping them in.
        start = time.perf_counter()
        for model in (unet, vae, text):
            for p in model.parameters():
                p.detach().reshape(-1)[:: 4096 // p.element_size()].sum()
        return result | {"paged_in_s": time.perf_counter() - start, "paged_in_rss_gib": peak_rss_gib()}
    gen = torch.Generator().manual_seed(0)
    ids = torch.full((2, 77), 49407, dtype=torch.long)
    context = torch.randn((2, 77, 768), generator=gen).to(torch_dtype)

    def unet_fn(size: int) -> Callable[[], object]:
        latents = torch.randn((2, 4, size // 8, size // 8), generator=gen).to(torch_dtype)
        return lambda: unet(latents, torch.tensor([500, 500]), encoder_hidden_states=context).sample

    with torch.inference_mode():
        if stage == "text":
            fn = lambda: text(ids).last_hidden_state  # noqa: E731
        elif stage in ("unet256", "unet512"):
            fn = unet_fn(int(stage[4:]))
        elif stage == "vae512":
            latents = torch.randn((1, 4, 64, 64), generator=gen).to(torch_dtype)
            fn = lambda: vae.decode(latents).sample  # noqa: E731
        else:
            sigmas, timesteps = euler_sigmas(STEPS)

            def fn() -> None:
                cond = text(ids).last_hidden_state
                x = torch.randn((1, 4, 64, 64), generator=gen).to(torch_dtype) * sigmas[0]
                for i, t in enumerate(timesteps):
                    scaled = torch.cat([x, x]) / (sigmas[i] ** 2 + 1) ** 0.5
                    eps_u, eps_c = unet(scaled, torch.tensor([t, t]), encoder_hidden_states=cond).sample.chunk(2)
                    x = x + (eps_u + 7.5 * (eps_c - eps_u)) * (sigmas[i + 1] - sigmas[i])
                vae.decode(x / 0.18215)

            return result | {"times": [_once(fn)], "peak_rss_gib": peak_rss_gib()}
        return result | {"times": timed(fn, repeat), "peak_rss_gib": peak_rss_gib()}


def child(python: Path, script: str, args: list[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([str(python), script, "--child", *args], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"rc {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def interleaved(script: str, runs: list[tuple[Path, list[str]]], rounds: int) -> list[dict]:
    """Children of `script` started together (each loads meanwhile) and then timed in turns: each
    run of each child waits until the previous child's run has finished, `rounds` rounds (the
    warm-up included)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), RUN_SD15_PACED="1")
    children = [subprocess.Popen([str(python), script, "--child", *args], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                for python, args in runs]
    last: list[str] = [""] * len(children)

    def next_line(i: int) -> str:
        """Child i's next line: "ready", or its final JSON (or "" when it has exited)."""
        line = children[i].stdout.readline()
        while line and line.strip() != "ready" and not line.startswith("{"):
            line = children[i].stdout.readline()
        last[i] = line.strip()
        return last[i]

    for i in range(len(children)):
        next_line(i)
    for _ in range(rounds):
        for i, child in enumerate(children):
            if last[i] == "ready":
                child.stdin.write("go\n")
                child.stdin.flush()
                next_line(i)
    results = []
    for i, child in enumerate(children):
        while last[i] == "ready":  # more runs than rounds (should not happen): let it finish
            child.stdin.write("go\n")
            child.stdin.flush()
            next_line(i)
        error = child.stderr.read()
        child.wait()
        results.append(json.loads(last[i]) if last[i].startswith("{")
                       else {"error": error.strip().splitlines()[-1] if error.strip() else f"rc {child.returncode}"})
    return results


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal"))) / 2**20
    return f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM"


def fmt(result: dict) -> str:
    if not result:
        return "—"
    if "error" in result:
        return f"error: {result['error'][:60]}"
    times = result["times"]
    low = f" (min {min(times):.2f})" if len(times) > 1 else ""
    held = f" ({result['held_rss_gib']:.1f} held)" if "held_rss_gib" in result else ""
    return f"{statistics.median(times):.2f} s{low} / {result['peak_rss_gib']:.1f} GiB{held}"


@dataclass(frozen=True)
class Benchmark:
    """What a model's comparison runs: its stages and each side's runner of one stage."""

    title: str
    doc: str  # the script's docstring, its --help
    script: str  # the file whose `--child` runs one (side, stage)
    stages: tuple[str, ...]
    ours_only: frozenset[str]
    run_ours: Callable[[str, int, Path, str], dict]  # stage, repeat, cache folder, dtype
    run_diffusers: Callable[[str, int, int, str], dict]  # stage, repeat, torch threads, dtype
    results: str  # the results file's name after the date
    ref_dtypes: str = "float32,bfloat16"


def main(bench: Benchmark | None = None) -> None:
    bench = bench or SD15
    parser = argparse.ArgumentParser(description=bench.doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", default=",".join(bench.stages))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--ours-dtypes", default="float32")
    parser.add_argument("--ref-dtypes", default=bench.ref_dtypes)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / f"{date.today()}-{bench.results}.md")
    parser.add_argument("--interleave", action="store_true",
                        help="run ours and diffusers (one dtype each) in turns, one run at a time")
    parser.add_argument("--child", nargs=5, metavar=("SIDE", "STAGE", "DTYPE", "REPEAT", "ARG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        side, stage, dtype, repeat, arg = args.child
        out = (bench.run_ours(stage, int(repeat), Path(arg), dtype) if side == "ours"
               else bench.run_diffusers(stage, int(repeat), int(arg), dtype))
        print(json.dumps(out))
        return

    # load_first goes last: the caches it writes would push the other stages' files out of the page cache.
    stages = sorted(args.stages.split(","), key=lambda stage: stage == "load_first")
    rows = []
    lines = [f"# {bench.title} (random weights, full size) on {machine()}", "",
             f"{date.today()}; ours: mlx-sd (MLX CPU); reference: diffusers + torch {args.threads} threads; "
             f"median of {args.repeat} after a warm-up (end to end and loads: one run); time / peak RSS; "
             "ratio = ours / diffusers' faster dtype (lower is better). Our activations are fp32: "
             "`ours float16` stores the weights in fp16 and computes in fp32; `ours bfloat16` also runs the "
             "matrix products and convolutions in bf16 with fp32 accumulation where the processor's class has a "
             "faster bf16 GEMM (docs/cpu-backend.md).", "",
             "| stage | " + " | ".join(f"ours {d}" for d in args.ours_dtypes.split(",")) + " | "
             + " | ".join(f"diffusers {d}" for d in args.ref_dtypes.split(",")) + " | ratio (time) | ratio (RSS) |",
             "|---" * (3 + len(args.ours_dtypes.split(",")) + len(args.ref_dtypes.split(","))) + "|"]
    with tempfile.TemporaryDirectory(prefix="mlx-sd-bench-") as cache_dir:
        if any(s not in ("load_cold", "load_first") for s in stages):  # the converted cache that "cached" loads read
            for dtype in args.ours_dtypes.split(","):
                child(OURS_PY, bench.script, ["ours", "load_cached", dtype, "1", cache_dir])
        for stage in stages:
            if args.interleave and stage not in bench.ours_only:
                (ours_dtype,), (ref_dtype,) = args.ours_dtypes.split(","), args.ref_dtypes.split(",")
                rounds = 1 if stage.startswith("e2e") else args.repeat + 1
                mine, theirs = interleaved(bench.script,
                                           [(OURS_PY, ["ours", stage, ours_dtype, str(args.repeat), cache_dir]),
                                            (REF_PY, ["diffusers", stage, ref_dtype, str(args.repeat),
                                                      str(args.threads)])], rounds)
                ours, ref = {ours_dtype: mine}, {ref_dtype: theirs}
            else:
                ours = {d: child(OURS_PY, bench.script, ["ours", stage, d, str(args.repeat), cache_dir])
                        for d in args.ours_dtypes.split(",")}
                ref = {d: {} if stage in bench.ours_only
                       else child(REF_PY, bench.script, ["diffusers", stage, d, str(args.repeat), str(args.threads)])
                       for d in args.ref_dtypes.split(",")}
            ok_ours = [r for r in ours.values() if "times" in r]
            ok_ref = [r for r in ref.values() if "times" in r]
            ratio_t = ratio_m = "n/a"
            if ok_ours and ok_ref:
                best_ours = min(ok_ours, key=lambda r: statistics.median(r["times"]))
                best_ref = min(ok_ref, key=lambda r: statistics.median(r["times"]))
                ratio_t = f"{statistics.median(best_ours['times']) / statistics.median(best_ref['times']):.2f}x"
                ratio_m = f"{best_ours['peak_rss_gib'] / best_ref['peak_rss_gib']:.2f}x"
            row = (f"| {stage} | " + " | ".join(fmt(r) for r in ours.values()) + " | "
                   + " | ".join(fmt(r) for r in ref.values()) + f" | {ratio_t} | {ratio_m} |")
            rows.append({"stage": stage, "ours": ours, "diffusers": ref})
            lines.append(row)
            print(row, flush=True)
    blas = next((r.get("blas") for row in rows for r in row["ours"].values() if r.get("blas")), "?")
    lines += ["", f"Our BLAS: {blas}. Raw runs:", "", "```json", json.dumps(rows, indent=1), "```", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")


SD15 = Benchmark("SD-1.5", __doc__, __file__, STAGES, frozenset(OURS_ONLY), run_ours, run_diffusers, "linux-cpu")

if __name__ == "__main__":
    main()
