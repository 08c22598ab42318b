"""`mlx-sd serve --hostfile HOSTS.json`: one server process per host, as a group (docs/distributed.md).

Without MLX_RANK in its environment, `serve --hostfile` is the launcher: it runs `mlx.launch` with the
same command line, which starts it once per host with MLX_RANK and MLX_HOSTFILE set. Each of those
joins the group; rank 0 serves, the others follow (mlx_sd.engine.distributed).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    import mlx.core as mx

    from grpc_service.server import ServerSettings
    from mlx_sd.engine.distributed import GroupEngine
    from mlx_sd.engine.pipeline import Pipeline

log = logging.getLogger(__name__)

# A first request may load (or convert) a checkpoint on every rank before its first step.
DEFAULT_RANK_TIMEOUT_S = 300.0
EXIT_GROUP_LOST = 75  # EX_TEMPFAIL: the service manager restarts the group


def group_env() -> bool:
    """Whether this process was started as a rank of a group (by `mlx.launch`)."""
    return "MLX_RANK" in os.environ and "MLX_HOSTFILE" in os.environ


def launch_command(hostfile: Path, argv: list[str]) -> list[str]:
    """The `mlx.launch` command line that runs `argv` (this `mlx-sd serve ...`) once per host of `hostfile`."""
    launcher = shutil.which("mlx.launch", path=str(Path(sys.executable).parent)) or "mlx.launch"
    return [launcher, "--hostfile", str(hostfile), "--backend", "ring", "--", *argv]


def launch_group(hostfile: Path, argv: list[str]) -> int:
    """Runs the group until SIGINT/SIGTERM (forwarded to every local process of the group) or until a
    rank ends on its own; returns the exit status: 0 after a signal, else EXIT_GROUP_LOST, so that a
    service manager restarts the group (`mlx.launch` itself exits 0 either way)."""
    group = subprocess.Popen(launch_command(hostfile, argv), start_new_session=True)
    signalled = []

    def forward(signum: int, _frame: object) -> None:
        signalled.append(signum)
        os.killpg(group.pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        group.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0 if signalled else EXIT_GROUP_LOST


def join_group() -> mx.distributed.Group:
    """This process's group, over the ring backend (MLX_RANK and MLX_HOSTFILE say where it stands)."""
    import mlx.core as mx

    group = mx.distributed.init(strict=True, backend="ring")
    log.info("rank %d of %d: %s", group.rank(), group.size(), "serving" if group.rank() == 0 else "following")
    return group


def run_follower(group: mx.distributed.Group, settings: ServerSettings) -> int:
    """A rank > 0: holds the model and makes its share of every request until rank 0 stops; returns the
    exit status (EXIT_GROUP_LOST when the group broke)."""
    import mlx.core as mx

    from mlx_sd.cpu.runtime import release_memory
    from mlx_sd.engine.distributed import Links, follow
    from mlx_sd.engine.errors import RankLost

    try:
        follow(_pipeline(settings), Links(group), after_job=release_memory)
    except RankLost as exc:
        log.error("%s", exc)
        return EXIT_GROUP_LOST
    finally:
        mx.clear_streams()
    return 0


def rank_zero_engine(group: mx.distributed.Group, settings: ServerSettings, timeout: float) -> GroupEngine:
    """Rank 0's engine, which spreads each request over the group."""
    import mlx.core as mx

    from mlx_sd.cpu.runtime import release_memory
    from mlx_sd.engine.distributed import GroupEngine

    return GroupEngine(_pipeline(settings), group, timeout, settings.max_queued, after_job=release_memory,
                       on_exit=mx.clear_streams)


def _pipeline(settings: ServerSettings) -> Pipeline:
    from mlx_sd.engine import create_pipeline

    return create_pipeline(settings.models_dir, cache_dir=settings.cache_dir, dtype=settings.dtype,
                           quantize_bits=settings.quantize_bits, memory_budget=settings.memory_budget,
                           low_memory=settings.low_memory, pad_attention_heads=settings.pad_attention_heads,
                           prediction_type=settings.prediction_type)


def exit_group_lost() -> NoReturn:
    """Ends rank 0 after the group broke. The MLX thread may be stuck in a collective for good, which
    an ordinary exit would wait for."""
    logging.shutdown()
    os._exit(EXIT_GROUP_LOST)
