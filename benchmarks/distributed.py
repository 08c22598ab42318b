"""One rank against two on one machine: throughput of `mlx-sd serve --hostfile` in images per minute.

Each configuration runs as real `serve` processes on loopback (the ranks started as `mlx.launch`
starts them), pinned to cores with sched_setaffinity (Linux): one rank on half the cores, two ranks
on half each, and, for reference, one rank on all of them. The configurations alternate, round by
round; each round's first request (the model's load) is not timed. Two ranks' ideal is twice one
rank's throughput on half the cores; the shortfall is the group's overhead (the collectives, the
ranks waiting for each other at every step, and the request and pixels travelling). The collectives'
own cost is measured apart: two ranks exchanging a step's status, a request and a request's pixels.

    nice .venv/bin/python benchmarks/distributed.py --size 256 --steps 10 --images 4 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from harness import REPO, TINY_MODEL, write_report

from grpc_service.client import ClientSettings, ImageServiceClient
from grpc_service.servicer import EncodedImages
from mlx_sd.engine.request import GenerationRequest

START_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Group:
    """`serve` processes, one per entry of `cores` (each pinned to its cores); a group when more than one."""

    def __init__(self, models: Path, work: Path, cores: list[set[int]]) -> None:
        self.processes: list[subprocess.Popen[str]] = []
        ring = work / "ring.json"
        ring.write_text(json.dumps([[f"127.0.0.1:{free_port()}"] for _ in cores]))
        hosts = work / "hosts.json"
        hosts.write_text(json.dumps({"hosts": [{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}] * len(cores)}))
        lines: queue.Queue[str | None] = queue.Queue()
        for rank, mine in enumerate(cores):
            command = [sys.executable, "-m", "mlx_sd.app.cli", "serve", str(models), "--no-tls", "--host",
                       "127.0.0.1", "--port", "0", "--no-bonjour", "--config-dir", str(work / "config"),
                       "--log-level", "warning"]
            env = {**os.environ, "MKL_NUM_THREADS": str(len(mine)), "OMP_NUM_THREADS": str(len(mine))}
            if len(cores) > 1:
                command += ["--hostfile", str(hosts)]
                env |= {"MLX_RANK": str(rank), "MLX_HOSTFILE": str(ring)}
            process = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True, preexec_fn=_pinned(mine))
            self.processes.append(process)
            if rank == 0:
                threading.Thread(target=_read, args=(process, lines), daemon=True).start()
        while (line := lines.get(timeout=START_S)) is not None and "listening on " not in line:
            pass
        if line is None:
            raise RuntimeError("rank 0 exited before it served")
        self.address = line.split("listening on ")[1].split()[0]

    def close(self) -> None:
        self.processes[0].terminate()  # rank 0 tells the others to stop
        for process in self.processes:
            process.wait(timeout=START_S)


def _pinned(cores: set[int]) -> Callable[[], None]:
    return lambda: os.sched_setaffinity(0, cores)


def _read(process: subprocess.Popen[str], lines: queue.Queue[str | None]) -> None:
    assert process.stdout is not None
    for line in process.stdout:
        lines.put(line)
    lines.put(None)


def collectives_rank(size: int, images: int) -> None:
    """As a rank of a group (MLX_RANK set): the median seconds of each exchange; rank 0 prints them."""
    import mlx.core as mx
    import numpy as np

    from mlx_sd.engine.distributed import MESSAGE_BYTES, Links

    links = Links(mx.distributed.init(strict=True, backend="ring"))

    def median_s(buffer: np.ndarray, count: int) -> float:
        for _ in range(3):
            links.gather(buffer, "a warm-up")
        times = []
        for _ in range(count):
            started = time.perf_counter()
            links.gather(buffer, "a buffer")
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    share = -(-images // links.size)
    result = {"status": median_s(np.zeros(6, np.int64), 200),
              "request": median_s(np.zeros(MESSAGE_BYTES, np.uint8), 50),
              "pixels": median_s(np.zeros((share, size, size, 3), np.uint8), 20)}
    if links.rank == 0:
        print(json.dumps(result))


def measure_collectives(size: int, images: int, cores: list[set[int]], work: Path) -> dict[str, float]:
    ring = work / "collectives.json"
    ring.write_text(json.dumps([[f"127.0.0.1:{free_port()}"] for _ in cores]))
    processes = [
        subprocess.Popen([sys.executable, __file__, "--size", str(size), "--images", str(images), "--collective-rank"],
                         env={**os.environ, "MLX_RANK": str(rank), "MLX_HOSTFILE": str(ring)},
                         stdout=subprocess.PIPE, text=True, preexec_fn=_pinned(mine))
        for rank, mine in enumerate(cores)
    ]
    out, _ = processes[0].communicate(timeout=START_S)
    for process in processes[1:]:
        process.wait(timeout=START_S)
    return json.loads(out)


def timed_requests(address: str, request: GenerationRequest, repeat: int) -> list[float]:
    """Seconds per request, after one untimed request (the model's load)."""
    times = []
    with ImageServiceClient(ClientSettings(address, tls=False)) as client:
        for i in range(repeat + 1):
            started = time.perf_counter()
            *_, last = client.generate(request)
            assert isinstance(last, EncodedImages) and len(last.images) == request.batch_size
            if i:
                times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models-dir", type=Path, help="a model directory (default: the tiny test model)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--images", type=int, default=4, help="the request's batch_size")
    parser.add_argument("--repeat", type=int, default=2, help="timed requests per configuration and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--collective-rank", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.collective_rank:
        collectives_rank(args.size, args.images)
        return

    all_cores = sorted(os.sched_getaffinity(0))
    half = len(all_cores) // 2
    configs = {
        "1 rank, half the cores": [set(all_cores[:half])],
        "2 ranks, half the cores each": [set(all_cores[:half]), set(all_cores[half:2 * half])],
        "1 rank, all the cores": [set(all_cores)],
    }
    request = GenerationRequest(prompt="a lighthouse on a cliff", width=args.size, height=args.size,
                                steps=args.steps, seed=1, sampler="Euler a", batch_size=args.images)
    times: dict[str, list[float]] = {name: [] for name in configs}
    loads = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as tmp:
        models = args.models_dir
        if models is None:
            models = Path(tmp) / "models"
            shutil.copytree(TINY_MODEL, models / "stable-diffusion")
        for _ in range(args.rounds):
            for name, cores in configs.items():
                work = Path(tempfile.mkdtemp(dir=tmp))
                group = Group(models, work, cores)
                try:
                    times[name] += timed_requests(group.address, request, args.repeat)
                finally:
                    group.close()
                loads.append(os.getloadavg()[0])
        exchanges = measure_collectives(args.size, args.images, configs["2 ranks, half the cores each"], Path(tmp))

    per_minute = {name: 60 * args.images / statistics.median(samples) for name, samples in times.items()}
    one, two = per_minute["1 rank, half the cores"], per_minute["2 ranks, half the cores each"]
    per_request = args.steps * exchanges["status"] + exchanges["request"] + exchanges["pixels"]
    rows = "\n".join(f"| {name} | {per_minute[name]:.1f} | {statistics.median(times[name]):.2f} | "
                     f"{', '.join(f'{t:.2f}' for t in times[name])} |" for name in configs)
    body = f"""
A request of {args.images} images (batch_size {args.images}) at {args.size}x{args.size}, {args.steps} steps of
Euler a, {'the tiny test model' if args.models_dir is None else args.models_dir}; {args.rounds} rounds, the
configurations alternating, {args.repeat} timed requests each per round after an untimed one.
Load average (1 min) at the start and after each configuration: {', '.join(f'{x:.2f}' for x in loads)}.

| configuration | images/minute | median s/request | samples (s) |
| --- | --- | --- | --- |
{rows}

Two ranks against one on half the cores: **{two / one:.2f}x** (ideal 2.00x), so the group's
overhead is **{(1 - two / (2 * one)) * 100:.0f}%** of ideal scaling.

The collectives alone (two ranks on loopback, medians): a step's status {exchanges['status'] * 1e3:.2f} ms,
the request {exchanges['request'] * 1e3:.2f} ms, a rank's {-(-args.images // 2)} images' pixels
{exchanges['pixels'] * 1e3:.2f} ms: {per_request * 1e3:.1f} ms a request of {args.steps} steps, or
{per_request / statistics.median(times["2 ranks, half the cores each"]) * 100:.2f}% of its median time on two ranks.
The rest of the shortfall is the ranks waiting for each other at every step, on a shared CPU.
"""
    write_report(f"{time.strftime('%Y-%m-%d')}-distributed", "One rank against two on one machine", body)


if __name__ == "__main__":
    main()
