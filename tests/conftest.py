"""Shared fixtures: a real gRPC server on a loopback port (TLS on by default) and clients for it.

The server modules are imported inside the fixtures, so test files that use none of them do not
depend on them importing cleanly.

`backend`: tests that take it run once on MLX's own ops (what Metal runs) and once on the CPU
kernels; the CPU kernels' run is skipped where they cannot run, or where `MLX_SD_BACKEND=mlx`
forces MLX ops for the whole process (CI's second pass).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from mlx_sd.cpu.runtime import configure

configure()  # as the entry points do: choose the BLAS before any test module imports mlx.core

from mlx_sd.engine.backends import Backend, from_environment  # noqa: E402  (after the BLAS is chosen)

if TYPE_CHECKING:
    import grpc

    from grpc_service.client import ClientSettings, ImageServiceClient
    from grpc_service.generated import imageservice_pb2_grpc as pb_grpc
    from grpc_service.server import RunningServer


FIXTURES = Path(__file__).parent / "fixtures"
SD1_TINY = FIXTURES / "sd1_tiny"
TINY_MODEL = SD1_TINY / "diffusers"  # the tiny SD-1 model as diffusers folders (see its README)


def install_tiny_model(models_dir: Path) -> Path:
    """`models_dir` with the tiny model in the default model's place, `stable-diffusion/`."""
    shutil.copytree(TINY_MODEL, models_dir / "stable-diffusion")
    return models_dir


def fake_result(*seeds: int, color: tuple[int, int, int] = (255, 0, 0), size: int = 2) -> Any:
    """A GenerationResult as a fake engine yields it: one `size`-pixel square of `color` per seed."""
    import numpy as np

    from mlx_sd.engine.events import GeneratedImage, GenerationResult
    from mlx_sd.engine.images import Parameters

    pixels = np.broadcast_to(np.array(color, np.uint8), (size, size, 3)).copy()
    return GenerationResult([
        GeneratedImage(pixels, seed, Parameters(prompt="", negative_prompt="", steps=1, sampler="Euler", cfg_scale=7.0,
                                                seed=seed, width=size, height=size, model_name="fake", model_hash="0"))
        for seed in seeds
    ])


def backend_or_skip(name: str) -> Backend:
    """The backend a test parameter names, or a skip where the CPU kernels cannot or must not run."""
    backend = Backend(name)
    if backend is Backend.CPU and from_environment() is not Backend.CPU:
        pytest.skip("CPU kernels not used here: MLX_SD_BACKEND=mlx, or not built, or MLX is not on the CPU")
    return backend


@pytest.fixture(scope="module", params=[b.value for b in Backend])
def backend(request: pytest.FixtureRequest) -> Backend:
    return backend_or_skip(request.param)


@pytest.fixture(scope="session")
def sd1_single_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SD-1 model as an original single-file checkpoint (composed from the committed
    diffusers form; see tests/fixtures/sd1_tiny/README.md). Treat it as read-only."""
    from safetensors.numpy import save_file

    from tests.fixtures.sd1_keymap import single_file_from_diffusers

    path = tmp_path_factory.mktemp("sd1_single_file") / "model.safetensors"
    save_file(single_file_from_diffusers(SD1_TINY), str(path))
    return path


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    path = tmp_path / "models"
    path.mkdir()
    return path


@pytest.fixture
def tiny_models(models_dir: Path) -> Path:
    """`models_dir`, the folder `server_factory` serves, holding the tiny model."""
    return install_tiny_model(models_dir)


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    return tmp_path / "config"


@pytest.fixture
def server_factory(models_dir: Path, config_dir: Path) -> Iterator[Callable[..., RunningServer]]:
    """start(engine=None, **settings) -> a started server on 127.0.0.1 with a free port; stopped at teardown."""
    from grpc_service.server import ServerSettings, start_server

    started: list[RunningServer] = []

    def start(engine: Any = None, **overrides: Any) -> RunningServer:
        """`engine`: an Engine, or a plain generate function, which then runs on a real worker."""
        from mlx_sd.engine.worker import GenerationWorker

        fields = {"models_dir": models_dir, "config_dir": config_dir, "host": "127.0.0.1", "port": 0, **overrides}
        if engine is not None and not hasattr(engine, "shutdown"):
            engine = GenerationWorker(engine, max_queued=fields.get("max_queued", 8))
        running = start_server(ServerSettings(**fields), engine)
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop(None)


@pytest.fixture
def server(server_factory: Callable[..., RunningServer]) -> RunningServer:
    return server_factory()


def client_settings(running: RunningServer, **overrides: Any) -> ClientSettings:
    """Settings that trust the server's own certificate and check it against the name localhost."""
    from grpc_service.client import ClientSettings

    fields: dict[str, Any] = {"server": f"localhost:{running.port}"}
    if running.tls is None:
        fields["tls"] = False
    else:
        fields["ca_file"] = running.tls.cert_path
    return ClientSettings(**{**fields, **overrides})


@pytest.fixture
def connect() -> Iterator[Callable[..., ImageServiceClient]]:
    from grpc_service.client import ImageServiceClient

    clients: list[ImageServiceClient] = []

    def make(running: RunningServer, **overrides: Any) -> ImageServiceClient:
        clients.append(ImageServiceClient(client_settings(running, **overrides)))
        return clients[-1]

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def stub_for() -> Iterator[Callable[..., pb_grpc.ImageGenerationServiceStub]]:
    """A raw stub, for RPCs and message shapes the client helper does not cover."""
    from grpc_service.client import open_channel
    from grpc_service.generated import imageservice_pb2_grpc as pb_grpc

    channels: list[grpc.Channel] = []

    def make(running: RunningServer, **overrides: Any) -> pb_grpc.ImageGenerationServiceStub:
        channels.append(open_channel(client_settings(running, **overrides)))
        return pb_grpc.ImageGenerationServiceStub(channels[-1])

    yield make
    for channel in channels:
        channel.close()
