"""A bounded soak: N clients mixing every RPC against one server for a fixed time.

    .venv/bin/python benchmarks/soak.py [--clients 8] [--seconds 60]

Each client has its own TLS channel over loopback and picks, call after call: Echo, FilesExist,
a 64 KiB UploadFile with its SHA-256, a small generation of the tiny model (64x64, 2 steps), a
generation it cancels after its first event, or an invalid generation request. Reports throughput,
p50/p99 latency per RPC, statuses and RSS growth in benchmarks/results/soak.md.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import random
import threading
import time
from collections.abc import Callable

import grpc
from harness import generation, percentile, rss_mib, tiny_server, write_report

from grpc_service.generated import imageservice_pb2 as pb

UPLOAD = bytes(range(256)) * 256
UPLOAD_SHA256 = hashlib.sha256(UPLOAD).hexdigest()


def mix(stub, client: int) -> dict[str, tuple[float, Callable[[], object]]]:
    """name -> (weight, call)."""
    def cancelled_generation() -> None:
        stream = stub.GenerateImage(generation(64, 50), timeout=60)
        next(stream)
        stream.cancel()

    return {
        "Echo": (3, lambda: stub.Echo(pb.EchoRequest(), timeout=60)),
        "FilesExist": (3, lambda: stub.FilesExist(
            pb.FilesExistRequest(files=["stable-diffusion/unet/config.json", "../escape", "missing"]), timeout=60)),
        "UploadFile": (2, lambda: stub.UploadFile(iter([pb.UploadFileRequest(
            filename=f"soak/client-{client}.bin", chunk_data=UPLOAD, sha256=UPLOAD_SHA256)]), timeout=60)),
        "GenerateImage": (1, lambda: list(stub.GenerateImage(generation(64, 2), timeout=60))),
        "GenerateImage (cancelled)": (0.5, cancelled_generation),
        "GenerateImage (invalid)": (0.5, lambda: list(stub.GenerateImage(generation(65, 2), timeout=60))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    latencies: dict[str, list[float]] = collections.defaultdict(list)
    statuses: collections.Counter[tuple[str, str]] = collections.Counter()
    lock = threading.Lock()

    with tiny_server() as server:
        list(server.stub().GenerateImage(generation(64, 2)))  # load the model
        rss_start = rss_mib()
        deadline = time.monotonic() + args.seconds

        def client(index: int) -> None:
            rng = random.Random(args.seed * 1000 + index)
            calls = mix(server.stub(), index)
            names, weights = list(calls), [weight for weight, _ in calls.values()]
            while time.monotonic() < deadline:
                name = rng.choices(names, weights)[0]
                started = time.perf_counter()
                try:
                    calls[name][1]()
                    code = "OK"
                except grpc.RpcError as error:
                    code = error.code().name
                elapsed = (time.perf_counter() - started) * 1000
                with lock:
                    latencies[name].append(elapsed)
                    statuses[(name, code)] += 1

        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        began = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        duration = time.monotonic() - began
        rss_end = rss_mib()
        alive = server.stub().Echo(pb.EchoRequest(), timeout=10).message == "HELLO"

    total = sum(len(values) for values in latencies.values())
    rows = ["| RPC | calls | calls/s | p50 | p99 | statuses |", "| --- | ---: | ---: | ---: | ---: | --- |"]
    for name in sorted(latencies):
        codes = ", ".join(f"{code} {count}" for (rpc, code), count in sorted(statuses.items()) if rpc == name)
        values = latencies[name]
        rows.append(f"| {name} | {len(values)} | {len(values) / duration:.1f} | {percentile(values, 50):.1f} ms | "
                    f"{percentile(values, 99):.1f} ms | {codes} |")
    errors = collections.Counter(code for (_, code), count in statuses.items() for _ in range(count) if code != "OK")
    body = (f"{args.clients} clients for {duration:.0f} s, {total} calls ({total / duration:.1f}/s). "
            f"Non-OK statuses: {dict(errors) or 'none'} (the invalid requests are meant to get "
            f"INVALID_ARGUMENT). RSS {rss_start:.0f} MiB at the start, {rss_end:.0f} MiB at the end "
            f"({rss_end - rss_start:+.0f} MiB). Server answering Echo afterwards: {alive}.\n\n" + "\n".join(rows))
    write_report("soak", "Soak: mixed RPCs from many clients", body)


if __name__ == "__main__":
    main()
