"""What the serving benchmarks share: a server on the tiny model, timing statistics, RSS, reports.

The server runs in this process on 127.0.0.1 (TLS, as by default) with the tiny SD-1 test model,
so MLX's allocator counters can be read alongside the process's RSS.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import shlex
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as `python benchmarks/x.py` from a checkout

from mlx_sd.cpu.runtime import configure  # noqa: E402

configure()  # the BLAS, before the server's modules import MLX, as `mlx-sd serve` does

from grpc_service.client import ClientSettings, open_channel  # noqa: E402
from grpc_service.generated import imageservice_pb2 as pb  # noqa: E402
from grpc_service.generated import imageservice_pb2_grpc as pb_grpc  # noqa: E402
from grpc_service.server import RunningServer, ServerSettings, start_server  # noqa: E402

TINY_MODEL = REPO / "tests" / "fixtures" / "sd1_tiny" / "diffusers"
RESULTS = REPO / "benchmarks" / "results"


@dataclass
class TinyServer:
    running: RunningServer
    client: ClientSettings
    models_dir: Path

    def stub(self) -> pb_grpc.ImageGenerationServiceStub:
        """A stub on a channel of its own (one per client thread, like separate devices)."""
        return pb_grpc.ImageGenerationServiceStub(open_channel(self.client))


@contextmanager
def tiny_server(model: Path = TINY_MODEL, **settings: object) -> Iterator[TinyServer]:
    """A server on `model` (a diffusers folder, copied; or a single file, linked) as its default model."""
    with tempfile.TemporaryDirectory(prefix="mlx-sd-bench-") as folder:
        models = Path(folder) / "models"
        if model.is_dir():
            shutil.copytree(model, models / "stable-diffusion")
        else:
            (models / "stable-diffusion").mkdir(parents=True)
            (models / "stable-diffusion" / "model.safetensors").symlink_to(model.resolve())
        running = start_server(ServerSettings(models_dir=models, config_dir=Path(folder) / "config",
                                              host="127.0.0.1", port=0, **settings))
        assert running.tls is not None
        try:
            yield TinyServer(running, ClientSettings(f"localhost:{running.port}", ca_file=running.tls.cert_path),
                             models)
        finally:
            running.stop(None)


def generation(size: int, steps: int, **fields: object) -> pb.ImageGenerationRequest:
    return pb.ImageGenerationRequest(prompt="a lighthouse on a cliff", width=size, height=size, steps=steps,
                                     seed=1, **fields)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def machine() -> str:
    import mlx.core as mx

    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").exists():
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 1024**3
    return (f"{platform.system()} {platform.release()}, {cpu}, {os.cpu_count()} CPUs, {memory:.0f} GiB RAM, "
            f"Python {platform.python_version()}, MLX {mx.__version__} ({mx.default_device()})")


def write_report(name: str, title: str, body: str) -> Path:
    """Writes benchmarks/results/<name>.md with the machine and the command that produced it."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.md"
    command = shlex.join([".venv/bin/python", *sys.argv])
    path.write_text(f"# {title}\n\n- date: {dt.date.today()}\n- machine: {machine()}\n- command: `{command}`\n\n"
                    f"{body.strip()}\n")
    print(path.read_text())
    return path
