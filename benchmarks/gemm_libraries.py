"""The GEMM libraries that install from PyPI or Debian, fp32 and bf16, at SD-1.5's GEMM shapes,
each on one thread, interleaved in one process.

    nice -n 5 .venv/bin/python benchmarks/gemm_libraries.py [--repeat 7] [LIBRARY=PATH ...]

A LIBRARY is `mkl` (cblas_sgemm, cblas_gemm_bf16bf16f32), `onednn` (dnnl_sgemm,
dnnl_gemm_bf16bf16f32), `openblas` (cblas_sgemm, and cblas_sbgemm where the build exports it),
`blis` (its cblas_sgemm) or `ours` (mlx_sd.cpu's own bf16 kernel, no path); by default every one
found in this environment. Each is loaded privately (RTLD_LOCAL) with its threads set to one, so
the comparison is kernel against kernel, free of each library's threading, and more robust than
whole-network timings on a loaded machine. For every shape the libraries take turns, `--repeat`
rounds, and the minimum of each is reported with its ratio to MKL's fp32 GEMM.

Every call's result is checked against numpy's fp32 product (bf16 to the rounding of its inputs),
so a fast wrong kernel cannot win.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path

for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "BLIS_NUM_THREADS"):
    os.environ[_name] = "1"  # read when each library loads
os.environ.setdefault("OPENBLAS_CORETYPE", "SkylakeX")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# (name, M, N, K): A is M x K (activations), B is N x K (a weight, read transposed).
SHAPES = [
    ("unet proj 64² 320", 8192, 320, 320),
    ("unet ff in 64² 320", 8192, 2560, 320),
    ("unet ff out 64² 1280", 8192, 320, 1280),
    ("unet proj 32² 640", 2048, 640, 640),
    ("unet ff in 32² 640", 2048, 5120, 640),
    ("unet proj 16² 1280", 512, 1280, 1280),
    ("conv tap unet 64² 320", 4096, 320, 320),
    ("conv tap vae 512² 128", 4096, 128, 128),
    ("conv tap vae 256² 256", 4096, 256, 256),
    ("conv tap vae 128² 512", 4096, 512, 512),
    ("conv unfolded 16² 1280", 512, 1280, 11520),
    ("attn scores 4096 d40", 512, 4096, 40),
    ("text proj 77 768", 77, 768, 768),
    ("text mlp 77 3072", 77, 3072, 768),
]
ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112
_I, _P, _F, _L = ctypes.c_int, ctypes.c_void_p, ctypes.c_float, ctypes.c_int64
CBLAS = [_I, _I, _I, _I, _I, _I, _F, _P, _I, _P, _I, _F, _P, _I]
DNNL = [ctypes.c_char, ctypes.c_char, _L, _L, _L, _F, _P, _L, _P, _L, _F, _P, _L]

Call = Callable[[int, int, int, int, int, int], None]  # (M, N, K, a, b, c) pointers


def _cblas(function: ctypes._CFuncPtr) -> Call:
    function.argtypes, function.restype = CBLAS, None
    return lambda m, n, k, a, b, c: function(ROW_MAJOR, NO_TRANS, TRANS, m, n, k, 1.0, a, k, b, k, 0.0, c, n)


def _dnnl(function: ctypes._CFuncPtr) -> Call:
    function.argtypes, function.restype = DNNL, ctypes.c_int

    def call(m: int, n: int, k: int, a: int, b: int, c: int) -> None:
        if function(b"N", b"T", m, n, k, 1.0, a, k, b, k, 0.0, c, n) != 0:
            raise RuntimeError("unsupported here")

    return call


def default_paths() -> dict[str, str]:
    data, site = Path(sysconfig.get_paths()["data"]), Path(sysconfig.get_paths()["purelib"])
    found = {
        "mkl": data / "lib" / "libmkl_rt.so.3",
        "onednn": data / "lib" / "libdnnl.so.3",
        "openblas": site / "cmeel.prefix" / "lib" / "libopenblas.so.0",
        "openblas-debian": Path("/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"),
        "blis": Path("/usr/lib/x86_64-linux-gnu/blis-pthread/libblis.so.4"),
    }
    return {name: str(path) for name, path in found.items() if path.exists()}


def bind(name: str, path: str) -> dict[str, Call]:
    """The fp32 and bf16 GEMMs a library provides, by label."""
    library = ctypes.CDLL(path, mode=ctypes.RTLD_LOCAL)
    calls: dict[str, Call] = {}
    if name.startswith("onednn"):
        calls[f"{name} fp32"] = _dnnl(library.dnnl_sgemm)
        calls[f"{name} bf16"] = _dnnl(library.dnnl_gemm_bf16bf16f32)
        return calls
    calls[f"{name} fp32"] = _cblas(library.cblas_sgemm)
    for symbol in ("cblas_gemm_bf16bf16f32", "cblas_sbgemm"):
        if hasattr(library, symbol):
            calls[f"{name} bf16"] = _cblas(getattr(library, symbol))
    if name.startswith("openblas"):
        library.openblas_set_num_threads(1)
    return calls


def bf16_round(x: np.ndarray) -> np.ndarray:
    """x rounded to bf16 (nearest even), as uint16 bits."""
    bits = x.view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def widen(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("libraries", nargs="*", help="NAME=PATH (default: those found)")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--ours", action="store_true", help="also mlx_sd.cpu's own bf16 kernel")
    args = parser.parse_args()
    paths = dict(item.split("=", 1) for item in args.libraries) or default_paths()
    calls: dict[str, Call] = {}
    for name, path in paths.items():
        calls.update(bind(name, path))
    if args.ours:
        from mlx_sd.cpu import kernels

        calls.update(kernels.gemm_benchmark_calls())
    print("libraries:", ", ".join(f"{n}={p}" for n, p in paths.items()))
    print(f"min of {args.repeat} interleaved rounds, one thread each; GFLOP/s and time / `mkl fp32`'s")
    rng = np.random.default_rng(0)
    for label, m, n, k in SHAPES:
        a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((n, k), np.float32)
        a16, b16 = bf16_round(a), bf16_round(b)
        expected = {False: a @ b.T, True: widen(a16) @ widen(b16).T}
        c = np.empty((m, n), np.float32)
        best, failed = dict.fromkeys(calls, float("inf")), {}
        for _ in range(args.repeat):
            for key, call in calls.items():
                if key in failed:
                    continue
                bf16 = key.endswith("bf16")
                x, y = (a16, b16) if bf16 else (a, b)
                start = time.perf_counter()
                try:
                    call(m, n, k, x.ctypes.data, y.ctypes.data, c.ctypes.data)
                except RuntimeError as exc:
                    failed[key] = str(exc)
                    continue
                best[key] = min(best[key], time.perf_counter() - start)
                error = np.abs(c - expected[bf16]).max() / np.abs(expected[bf16]).max()
                if error > 1e-3:
                    raise SystemExit(f"{key} at {label}: relative error {error:.1e}")
        base = best.get("mkl fp32") or next(iter(best.values()))
        flops = 2 * m * n * k
        cells = " | ".join(f"{key} {failed[key]}" if key in failed else f"{key} {flops / t / 1e9:5.0f} ({t / base:.2f}x)"
                           for key, t in best.items())
        print(f"{label:24s} {cells}", flush=True)


if __name__ == "__main__":
    main()
