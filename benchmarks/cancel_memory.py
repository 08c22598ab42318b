"""Memory after many cancelled generations: RSS and MLX's allocator, before and after.

    .venv/bin/python benchmarks/cancel_memory.py [--count 50] [--size 128]

Each generation (the tiny model, --size pixels, 150 steps) is cancelled by its client after its
second sampling step. Writes benchmarks/results/cancel_memory.md.
"""

from __future__ import annotations

import argparse
import gc
import time

import mlx.core as mx
from harness import generation, rss_mib, tiny_server, write_report

from grpc_service.generated import imageservice_pb2 as pb

SAMPLING = pb.SignpostEvent.EventType.SAMPLING


def snapshot() -> dict[str, float]:
    gc.collect()
    return {"RSS": rss_mib(), "MLX active": mx.get_active_memory() / 2**20, "MLX cache": mx.get_cache_memory() / 2**20}


def cancel_after_two_steps(stub, size: int) -> None:
    stream = stub.GenerateImage(generation(size, 150))
    steps = 0
    for response in stream:
        steps += sum(event.type == SAMPLING for event in response.events)
        if steps == 2:
            break
    stream.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=50)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()

    with tiny_server() as server:
        stub = server.stub()
        for _ in range(2):  # load the model, and let the allocator reach its steady state
            list(stub.GenerateImage(generation(args.size, 2)))
        before = snapshot()
        started = time.perf_counter()
        for _ in range(args.count):
            cancel_after_two_steps(stub, args.size)
        cancelling = time.perf_counter() - started
        list(stub.GenerateImage(generation(64, 1)))  # queued behind the last cancelled one: the worker is idle after
        after = snapshot()

    rows = ["| measure | baseline | after | growth |", "| --- | ---: | ---: | ---: |"]
    rows += [f"| {name} | {before[name]:.1f} MiB | {after[name]:.1f} MiB | {after[name] - before[name]:+.1f} MiB |"
             for name in before]
    body = (f"{args.count} generations of the tiny model ({args.size}x{args.size}, 150 steps) cancelled by the "
            f"client after their second sampling step, {cancelling / args.count:.2f} s each; then one small "
            "generation, so that the worker has finished with the last cancelled one. The server runs in the "
            "measuring process (TLS over loopback).\n\n" + "\n".join(rows))
    write_report("cancel_memory", "Memory after cancelled generations", body)


if __name__ == "__main__":
    main()
