"""Two ranks of `mlx-sd serve --hostfile` on loopback over MLX's ring backend, as `mlx.launch` starts
them (MLX_RANK and MLX_HOSTFILE set), serving the tiny model; a client talks to rank 0 over gRPC.

Every wait is on the ranks' output or exit, each bounded, so a broken group fails the test."""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import mlx.core as mx
import pytest
from typer.testing import CliRunner

from grpc_service.client import ClientSettings, ImageServiceClient
from grpc_service.servicer import EncodedImages
from mlx_sd.app import distributed
from mlx_sd.app.cli import app
from mlx_sd.app.distributed import EXIT_GROUP_LOST, launch_command
from mlx_sd.engine.events import ProgressEvent
from mlx_sd.engine.request import GenerationRequest

pytestmark = pytest.mark.skipif(not mx.distributed.is_available(), reason="MLX has no distributed backend here")

START_S = 120  # a rank's start (imports, the group's connections) on a busy two-core machine
REQUEST_S = 120
RANK_TIMEOUT_S = 10  # the ranks' --rank-timeout: how long rank 0 waits for a silent rank
REQUEST = GenerationRequest(prompt="a lighthouse", negative_prompt="blurry", width=64, height=64, steps=3,
                            seed=1234, sampler="Euler a", batch_size=4)


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@dataclass
class Rank:
    process: subprocess.Popen[str]
    lines: queue.Queue[str | None]

    def wait_for(self, text: str) -> str:
        """The next line of this rank's output that holds `text`."""
        seen = []
        while True:
            try:
                line = self.lines.get(timeout=START_S)
            except queue.Empty:
                raise AssertionError(f"never printed {text!r} but {seen}") from None
            seen.append(line)
            if line is None:
                raise AssertionError(f"the rank exited ({self.process.wait()}) before printing {text!r}")
            if text in line:
                return line

    def exits_with(self, code: int) -> bool:
        """Whether the rank exits with `code`; otherwise fails with what it printed."""
        status = self.process.wait(timeout=REQUEST_S)
        printed = []
        while (line := self.lines.get(timeout=REQUEST_S)) is not None:
            printed.append(line)
        assert status == code, f"exited with {status}, printed {printed}"
        return True


def start_rank(rank: int | None, ring: Path, hostfile: Path, models: Path, tmp: Path) -> Rank:
    """Rank `rank` of the group, or (None) a server alone, started the same way."""
    command = [sys.executable, "-m", "mlx_sd.app.cli", "serve", str(models), "--no-tls", "--host", "127.0.0.1",
               "--port", "0", "--no-bonjour", "--no-cache", "--config-dir", str(tmp / f"config{rank}"),
               "--shutdown-grace", "0"]
    env = dict(os.environ)
    if rank is not None:
        command += ["--hostfile", str(hostfile), "--rank-timeout", str(RANK_TIMEOUT_S)]
        env |= {"MLX_RANK": str(rank), "MLX_HOSTFILE": str(ring)}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    return Rank(process, lines)


@pytest.fixture
def group(tiny_models: Path, tmp_path: Path) -> Iterator[tuple[Rank, Rank, ImageServiceClient]]:
    """Rank 0 and rank 1, and a client of rank 0's server; both ranks are killed at teardown."""
    ring = tmp_path / "ring.json"
    ring.write_text(json.dumps([[f"127.0.0.1:{port}"] for port in free_ports(2)]))
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps({"hosts": [{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}] * 2}))
    ranks = [start_rank(rank, ring, hostfile, tiny_models, tmp_path) for rank in (0, 1)]
    try:
        address = ranks[0].wait_for("listening on ").split("listening on ")[1].split()[0]
        with ImageServiceClient(ClientSettings(address, tls=False)) as client:
            yield ranks[0], ranks[1], client
    finally:
        for rank in ranks:
            if rank.process.poll() is None:
                rank.process.kill()
            rank.process.wait(timeout=START_S)


def pngs(items: Iterator[ProgressEvent | EncodedImages]) -> list[bytes]:
    *_, last = items
    assert isinstance(last, EncodedImages)
    return last.images


def test_a_batch_of_4_gives_the_same_pngs_on_two_ranks_as_on_one(
        group: tuple[Rank, Rank, ImageServiceClient], tiny_models: Path, tmp_path: Path) -> None:
    _, _, client = group
    alone = start_rank(None, tmp_path, tmp_path, tiny_models, tmp_path)
    try:
        address = alone.wait_for("listening on ").split("listening on ")[1].split()[0]
        with ImageServiceClient(ClientSettings(address, tls=False)) as one:
            # One batch of four, made as two batches of two, and four batches of one: the same PNGs.
            spread, reference = pngs(client.generate(REQUEST)), pngs(one.generate(REQUEST))
            assert len(spread) == 4 and len(set(spread)) == 4  # four seeds, four images, in order
            assert spread == reference
            singles = dataclasses.replace(REQUEST, batch_size=1, batch_count=4)
            assert pngs(client.generate(singles)) == reference
    finally:
        alone.process.kill()
        alone.process.wait(timeout=REQUEST_S)


def test_a_cancel_on_rank_0_stops_rank_1_within_a_step(group: tuple[Rank, Rank, ImageServiceClient]) -> None:
    rank0, rank1, client = group
    steps = 40
    events = client.generate(dataclasses.replace(REQUEST, steps=steps, batch_size=2))
    for event in events:
        if isinstance(event, ProgressEvent) and event.step == 2:
            break
    events.close()  # cancels the call
    # Each rank logs the sampling steps it made of a request: rank 1 made at most one more than rank 0.
    made = [int(rank.wait_for(f"rank {i} made ").split(f"rank {i} made ")[1].split()[0])
            for i, rank in enumerate((rank0, rank1))]
    assert made[0] < steps and made[0] <= made[1] <= made[0] + 1, made
    # The group still works after the cancel.
    assert len(pngs(client.generate(dataclasses.replace(REQUEST, batch_size=2)))) == 2


@pytest.mark.parametrize(("fault", "message"), [
    # Its closed connection is usually noticed at once, else at the timeout: either way rank 1 is named.
    (signal.SIGKILL, "rank 1 "),
    (signal.SIGSTOP, f"rank 1 did not answer within {RANK_TIMEOUT_S} s"),  # alive, its sockets open, silent
], ids=["killed", "silent"])
def test_a_lost_rank_1_gives_unavailable_and_rank_0_exits_for_a_restart(
        group: tuple[Rank, Rank, ImageServiceClient], fault: signal.Signals, message: str) -> None:
    rank0, rank1, client = group
    events = client.generate(dataclasses.replace(REQUEST, steps=40))
    with pytest.raises(grpc.RpcError) as raised:
        for event in events:
            if isinstance(event, ProgressEvent) and event.step == 1:
                rank1.process.send_signal(fault)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert message in raised.value.details()
    assert rank0.exits_with(EXIT_GROUP_LOST)


def test_when_rank_0_dies_rank_1_exits_for_a_restart(group: tuple[Rank, Rank, ImageServiceClient]) -> None:
    rank0, rank1, _ = group
    rank0.process.send_signal(signal.SIGKILL)
    assert rank1.exits_with(EXIT_GROUP_LOST)


def test_stopping_rank_0_stops_the_group(group: tuple[Rank, Rank, ImageServiceClient]) -> None:
    rank0, rank1, client = group
    # After a request: serve takes over SIGTERM once it has printed where it listens, not before.
    assert len(pngs(client.generate(dataclasses.replace(REQUEST, batch_size=2)))) == 2
    rank0.process.send_signal(signal.SIGTERM)
    assert rank0.exits_with(0)
    assert rank1.exits_with(0)  # told to stop, not cut off


def test_the_launcher_runs_the_same_command_through_mlx_launch(tmp_path: Path) -> None:
    command = launch_command(tmp_path / "hosts.json", ["mlx-sd", "serve", "--hostfile", "hosts.json"])
    assert Path(command[0]).name == "mlx.launch"
    assert command[1:] == ["--hostfile", str(tmp_path / "hosts.json"), "--backend", "ring", "--",
                           "mlx-sd", "serve", "--hostfile", "hosts.json"]


def test_the_launcher_exits_for_a_restart_when_the_group_ends_on_its_own(monkeypatch: pytest.MonkeyPatch,
                                                                         tmp_path: Path) -> None:
    monkeypatch.setattr(distributed, "launch_command", lambda hostfile, argv: [sys.executable, "-c", "exit(1)"])
    assert distributed.launch_group(tmp_path / "hosts.json", ["mlx-sd", "serve"]) == EXIT_GROUP_LOST


def test_serve_refuses_a_missing_host_file(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["serve", str(tmp_path / "models"), "--hostfile", str(tmp_path / "hosts.json")],
                                env={"MLX_RANK": None, "MLX_HOSTFILE": None})
    assert result.exit_code == 1
    assert f"--hostfile: no such file: {tmp_path / 'hosts.json'}" in result.stderr
