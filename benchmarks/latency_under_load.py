"""p50/p99 latency of Echo, FilesExist and a small UploadFile, idle and while a generation runs.

    .venv/bin/python benchmarks/latency_under_load.py [--calls 200] [--size 192] [--steps 8]

The load is generations of the tiny model at --size pixels, one after another, for as long as the
loaded measurements take. Writes benchmarks/results/latency_under_load.md.
"""

from __future__ import annotations

import argparse
import hashlib
import threading
import time
from collections.abc import Callable

from harness import generation, percentile, tiny_server, write_report

from grpc_service.generated import imageservice_pb2 as pb

UPLOAD_BYTES = 64 * 1024


def rpcs(stub) -> dict[str, Callable[[], object]]:
    payload = bytes(range(256)) * (UPLOAD_BYTES // 256)
    digest = hashlib.sha256(payload).hexdigest()
    return {
        "Echo": lambda: stub.Echo(pb.EchoRequest(), timeout=30),
        "FilesExist": lambda: stub.FilesExist(
            pb.FilesExistRequest(files=["stable-diffusion/unet/config.json", "missing.safetensors"]), timeout=30),
        "UploadFile (64 KiB)": lambda: stub.UploadFile(
            iter([pb.UploadFileRequest(filename="bench/upload.bin", chunk_data=payload, sha256=digest)]), timeout=30),
    }


def measure(calls: dict[str, Callable[[], object]], count: int) -> dict[str, list[float]]:
    """Latencies in ms, the RPCs interleaved so that each sees the same conditions."""
    latencies: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(count):
        for name, call in calls.items():
            started = time.perf_counter()
            call()
            latencies[name].append((time.perf_counter() - started) * 1000)
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--size", type=int, default=192)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()

    with tiny_server() as server:
        stub = server.stub()
        calls = rpcs(stub)
        list(stub.GenerateImage(generation(64, 1)))  # load the model
        measure(calls, 10)  # warm up the channel
        idle = measure(calls, args.calls)

        stop = threading.Event()
        generations: list[float] = []

        def load() -> None:
            load_stub = server.stub()
            while not stop.is_set():
                started = time.perf_counter()
                list(load_stub.GenerateImage(generation(args.size, args.steps)))
                generations.append(time.perf_counter() - started)

        loader = threading.Thread(target=load)
        loader.start()
        time.sleep(1.0)  # the generation is under way
        loaded = measure(calls, args.calls)
        stop.set()
        loader.join()

    rows = ["| RPC | idle p50 | idle p99 | under load p50 | under load p99 | p50 ratio | p99 ratio |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name in calls:
        i50, i99 = percentile(idle[name], 50), percentile(idle[name], 99)
        l50, l99 = percentile(loaded[name], 50), percentile(loaded[name], 99)
        rows.append(f"| {name} | {i50:.2f} ms | {i99:.2f} ms | {l50:.2f} ms | {l99:.2f} ms | "
                    f"{l50 / i50:.1f}x | {l99 / i99:.1f}x |")
    body = (f"{args.calls} calls of each RPC, interleaved, on one TLS channel over loopback. Load: the tiny "
            f"model generating {args.size}x{args.size} with {args.steps} steps, back to back "
            f"({len(generations)} generations, {sum(generations) / max(1, len(generations)):.1f} s each).\n\n"
            + "\n".join(rows))
    write_report("latency_under_load", "Latency of the light RPCs while a generation runs", body)


if __name__ == "__main__":
    main()
