"""BLAS selection (`mlx_sd.cpu.runtime`): the pure logic with faked paths and CPU flags, the
fallback when a library does not load, and, in subprocesses (the BLAS must be chosen before
`mlx.core` is imported), that the fast BLAS computes what MLX's reference BLAS computes."""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from mlx_sd.cpu import runtime
from mlx_sd.cpu.runtime import REFERENCE, Blas

REPO = Path(__file__).resolve().parents[2]
PATHS = runtime.candidate_paths(Path("/venv"), Path("/venv/site"), "x86_64-linux-gnu")


@pytest.mark.parametrize(
    ("flags", "expected"),
    [({"sse2", "avx", "avx2", "avx512f"}, "SkylakeX"), ({"avx", "avx2"}, "Haswell"), ({"avx"}, "Sandybridge"),
     ({"sse2"}, None)],
)
def test_openblas_coretype_follows_cpu_flags(flags: set[str], expected: str | None) -> None:
    assert runtime.openblas_coretype(flags) == expected


def test_cpu_flags_are_read_from_cpuinfo(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert runtime.cpu_flags(cpuinfo) == {"fpu", "sse2", "avx2", "avx512f"}
    assert runtime.cpu_flags(tmp_path / "missing") == set()


def test_candidates_come_in_preference_order() -> None:
    present = {Path("/usr/lib/x86_64-linux-gnu/libopenblas.so.0"), Path("/venv/lib/libmkl_rt.so.2")}
    found = runtime.find_candidates(PATHS, exists=present.__contains__)
    assert found == [Blas("mkl", Path("/venv/lib/libmkl_rt.so.2")),
                     Blas("openblas", Path("/usr/lib/x86_64-linux-gnu/libopenblas.so.0"))]
    assert runtime.find_candidates(PATHS, exists=lambda _: False) == []


def test_select() -> None:
    mkl, openblas = Blas("mkl", Path("/m.so")), Blas("openblas", Path("/o.so"))
    assert runtime.select("auto", [mkl, openblas]) == mkl
    assert runtime.select("auto", []) == REFERENCE
    assert runtime.select("reference", [mkl]) == REFERENCE
    assert runtime.select("openblas", [mkl, openblas]) == openblas
    assert runtime.select("/opt/lib/libopenblas.so.0", []) == Blas("openblas", Path("/opt/lib/libopenblas.so.0"))
    with pytest.raises(ValueError, match="not installed"):
        runtime.select("mkl", [openblas])


def test_preload_sets_the_openblas_coretype_unless_the_user_did() -> None:
    loaded: list[str] = []
    env: dict[str, str] = {}
    blas = Blas("openblas", Path("/o.so"))
    assert runtime.preload(blas, env, flags=lambda: {"avx2"}, load=lambda path, mode: loaded.append(path)) == blas
    assert env == {"OPENBLAS_CORETYPE": "Haswell"} and loaded == ["/o.so"]
    env = {"OPENBLAS_CORETYPE": "Zen"}
    runtime.preload(blas, env, flags=lambda: {"avx512f"}, load=lambda path, mode: None)
    assert env == {"OPENBLAS_CORETYPE": "Zen"}


def test_preload_puts_mkl_threads_to_sleep_unless_the_user_chose() -> None:
    env: dict[str, str] = {}
    runtime.preload(Blas("mkl", Path("/m.so")), env, load=lambda path, mode: None)
    assert env == {"KMP_BLOCKTIME": "1"}
    env = {"KMP_BLOCKTIME": "200"}
    runtime.preload(Blas("mkl", Path("/m.so")), env, load=lambda path, mode: None)
    assert env == {"KMP_BLOCKTIME": "200"}


def test_preload_failure_falls_back_with_one_log_line(caplog: pytest.LogCaptureFixture) -> None:
    def fail(path: str, mode: int) -> None:
        raise OSError(f"{path}: cannot open shared object file")

    with caplog.at_level(logging.INFO, logger="mlx_sd.cpu.runtime"):
        blas = runtime.preload(Blas("mkl", Path("/gone.so")), {}, load=fail)
    assert blas == REFERENCE
    assert len(caplog.records) == 1 and "reference BLAS" in caplog.records[0].getMessage()


CHILD = """
import json, logging, sys
import numpy as np
logging.basicConfig(level=logging.INFO, format="%(message)s")
from mlx_sd.cpu.runtime import configure
blas = configure()
import mlx.core as mx
rng = np.random.default_rng(0)
a, b = (mx.array(rng.standard_normal(s, dtype=np.float32)) for s in ((192, 384), (384, 256)))
x = mx.array(rng.standard_normal((2, 24, 24, 64), dtype=np.float32))
w = mx.array(rng.standard_normal((96, 3, 3, 64), dtype=np.float32) * 0.05)
np.savez(sys.argv[1], matmul=np.array(a @ b), conv=np.array(mx.conv2d(x, w, padding=1)))
print(json.dumps(blas.name))
"""


def run_child(choice: str, out: Path) -> tuple[str, list[str]]:
    env = dict(os.environ, MLX_SD_BLAS=choice, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", CHILD, str(out)], env=env, capture_output=True, text=True,
                          timeout=300, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr.strip().splitlines()


@pytest.mark.skipif(sys.platform != "linux", reason="BLAS preloading is Linux-only")
def test_fast_blas_matches_the_reference(tmp_path: Path) -> None:
    paths = runtime.candidate_paths(Path(sysconfig.get_paths()["data"]), Path(sysconfig.get_paths()["purelib"]),
                                    sysconfig.get_config_var("MULTIARCH"))
    if not runtime.find_candidates(paths):
        pytest.skip("no fast BLAS installed")
    ref_name, _ = run_child("reference", tmp_path / "ref.npz")
    fast_name, log_lines = run_child("auto", tmp_path / "fast.npz")
    assert ref_name == "reference" and fast_name != "reference"
    assert [line for line in log_lines if line.startswith("BLAS: ")] == [log_lines[0]]
    ref, fast = np.load(tmp_path / "ref.npz"), np.load(tmp_path / "fast.npz")
    for name in ("matmul", "conv"):  # fp32 sums of <= 576 terms in another order
        np.testing.assert_allclose(fast[name], ref[name], rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(sys.platform != "linux", reason="BLAS preloading is Linux-only")
def test_an_unloadable_blas_falls_back_to_the_reference(tmp_path: Path) -> None:
    name, log_lines = run_child(str(tmp_path / "libopenblas.so.0"), tmp_path / "out.npz")
    assert name == "reference"
    assert len(log_lines) == 1 and "could not load openblas BLAS" in log_lines[0]


ORDER_CHILD = """
import json, sys
if sys.argv[1] == "late":
    import mlx.core  # as a script that imports MLX before the engine would
from mlx_sd.cpu.runtime import configure
blas = configure()
from mlx_sd.cpu import blas as cpu_blas, kernels
functions = cpu_blas.gemm()
print(json.dumps({"blas": blas.name, "gemm": None if functions is None else functions.choice.describe(),
                  "pool": kernels.kernels().pool_threads()}))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="BLAS preloading is Linux-only")
def test_the_cpu_kernels_get_the_fast_blas_and_their_threads_whatever_the_import_order() -> None:
    """A late configure() (mlx.core imported first) once left the kernels without their GEMMs and
    pool: a server started that way sampled on one core."""
    from mlx_sd.cpu.apply import available

    paths = runtime.candidate_paths(Path(sysconfig.get_paths()["data"]), Path(sysconfig.get_paths()["purelib"]),
                                    sysconfig.get_config_var("MULTIARCH"))
    if not runtime.find_candidates(paths) or not available():
        pytest.skip("no fast BLAS installed, or the CPU kernels are not built")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    children = {order: subprocess.run([sys.executable, "-c", ORDER_CHILD, order], env=env, capture_output=True,
                                      text=True, timeout=300, check=True) for order in ("early", "late")}
    early, late = (json.loads(children[order].stdout.strip().splitlines()[-1]) for order in ("early", "late"))
    assert early["blas"] != "reference" and early["gemm"] is not None
    assert late == early
    if early["blas"] == "mkl":  # MKL's per-thread setting lets the kernels run a thread per core
        assert early["pool"] == len(os.sched_getaffinity(0))
    assert "imported before the BLAS was chosen" in children["late"].stderr


class FakeLibc:
    def __init__(self, accepts: bool = True) -> None:
        self.calls: list[tuple] = []
        self.accepts = accepts

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append(("mallopt", param, value))
        return int(self.accepts)

    def malloc_trim(self, pad: int) -> int:
        self.calls.append(("malloc_trim", pad))
        return 1


def test_heap_pages_are_kept_for_reuse_and_trimmed_on_request() -> None:
    libc = FakeLibc()
    assert runtime.keep_heap_pages(libc)
    assert libc.calls == [("mallopt", runtime.M_MMAP_MAX, 0), ("mallopt", runtime.M_TRIM_THRESHOLD, 2**31 - 1),
                          ("mallopt", runtime.M_ARENA_MAX, 1)]
    runtime.trim_heap(libc)
    assert libc.calls[-1] == ("malloc_trim", 0)
    assert not runtime.keep_heap_pages(FakeLibc(accepts=False))


@pytest.mark.skipif(runtime._glibc() is None, reason="glibc on Linux only")
def test_populate_maps_in_whole_pages_and_keeps_their_contents() -> None:
    data = np.arange(1 << 18, dtype=np.float32)  # 1 MiB, not page-aligned in general
    expected = data.copy()
    kernel = tuple(int(part) for part in platform.release().split("-")[0].split(".")[:2])
    assert runtime.populate(data.ctypes.data, data.nbytes) == (kernel >= (5, 14))
    np.testing.assert_array_equal(data, expected)
    start = -(-data.ctypes.data // runtime.PAGE) * runtime.PAGE
    assert not runtime.populate(start + 1, 100)  # no whole page inside: nothing to do


def test_numpy_is_asked_for_small_pages_unless_the_user_chose() -> None:
    env: dict[str, str] = {}
    runtime.keep_numpy_pages_small(env)
    assert env == {"NUMPY_MADVISE_HUGEPAGE": "0"}
    chosen = {"NUMPY_MADVISE_HUGEPAGE": "1"}
    runtime.keep_numpy_pages_small(chosen)
    assert chosen == {"NUMPY_MADVISE_HUGEPAGE": "1"}


@pytest.mark.skipif(runtime._glibc() is None, reason="glibc only")
def test_the_real_glibc_accepts_the_settings() -> None:
    assert runtime.keep_heap_pages()
    runtime.trim_heap()
