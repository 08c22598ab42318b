"""Echo and FilesExist latency while hostile clients hold streams open, against the same server idle.

    .venv/bin/python benchmarks/stalled_streams.py [--uploads 200] [--readers 200] [--calls 200]

Holds --uploads UploadFile streams that send one byte and go silent, and --readers GenerateImage
calls whose responses are never read, then times Echo and FilesExist. Every client runs on this
machine, so all come from one address; the second run raises the per-address cap to the global
one, as if each stream came from a different machine. Writes benchmarks/results/stalled_streams.md.
"""

from __future__ import annotations

import argparse
import threading
import time
from collections import Counter
from collections.abc import Iterator

from harness import generation, percentile, tiny_server, write_report
from latency_under_load import measure

from grpc_service.generated import imageservice_pb2 as pb
from grpc_service.streams import StreamLimits


def held_streams(server, uploads: int, readers: int, release: threading.Event) -> tuple[list, Counter]:
    """Opens the hostile streams; returns them and how each ended so far (RESOURCE_EXHAUSTED: refused)."""

    def silent(index: int) -> Iterator[pb.UploadFileRequest]:
        yield pb.UploadFileRequest(filename=f"held/{index}.bin", chunk_data=b"x")
        release.wait()

    stub = server.stub()
    calls = [stub.UploadFile.future(silent(i)) for i in range(uploads)]
    calls += [stub.GenerateImage(generation(64, 2)) for _ in range(readers)]  # never read
    time.sleep(2.0)  # let the server admit or refuse them all before timing
    outcomes = Counter(c.code().name if c.done() else "held open" for c in calls)
    return calls, outcomes


def run(limits: StreamLimits, args: argparse.Namespace) -> str:
    with tiny_server(stream_limits=limits) as server:
        stub = server.stub()
        list(stub.GenerateImage(generation(64, 1)))  # load the model
        probes = {
            "Echo": lambda: stub.Echo(pb.EchoRequest(), timeout=30),
            "FilesExist": lambda: stub.FilesExist(pb.FilesExistRequest(files=["a.bin", "b/c.bin"]), timeout=30),
        }
        measure(probes, 10)
        idle = measure(probes, args.calls)
        release = threading.Event()
        calls, outcomes = held_streams(server, args.uploads, args.readers, release)
        try:
            attacked = measure(probes, args.calls)
        finally:
            release.set()
            for call in calls:
                call.cancel()
    rows = [f"| {name} | {percentile(idle[name], 50):.1f} | {percentile(idle[name], 99):.1f} | "
            f"{percentile(attacked[name], 50):.1f} | {percentile(attacked[name], 99):.1f} | "
            f"{percentile(attacked[name], 99) / percentile(idle[name], 99):.2f}x |" for name in probes]
    held = ", ".join(f"{count} {state}" for state, count in sorted(outcomes.items()))
    return (f"### {limits.max_streams} streams in all, {limits.max_streams_per_address} per address\n\n"
            f"Hostile streams: {held}.\n\n"
            "| call | idle p50 ms | idle p99 ms | held p50 ms | held p99 ms | p99 held / idle |\n"
            "| --- | --- | --- | --- | --- | --- |\n" + "\n".join(rows) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uploads", type=int, default=200)
    parser.add_argument("--readers", type=int, default=200)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    defaults = StreamLimits()
    body = run(defaults, args) + "\n" + run(StreamLimits(max_streams_per_address=defaults.max_streams), args)
    write_report("stalled_streams", "Echo and FilesExist while streams are held open", body)


if __name__ == "__main__":
    main()
