"""Builds and runs the gRPC server from explicit settings (nothing is read from the environment here)."""

from __future__ import annotations

import datetime as dt
import logging
import resource
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc

from grpc_service.auth import FailureLimit, FailureLimiter
from grpc_service.defaults import DEFAULT_HOST, DEFAULT_PORT
from grpc_service.drawthings import servicer as drawthings
from grpc_service.drawthings.identity import ServerIdentifier
from grpc_service.files import DEFAULT_MAX_UPLOAD_BYTES, ModelDirectory
from grpc_service.generated import drawthings_pb2_grpc as dt_pb_grpc
from grpc_service.generated import imageservice_pb2_grpc as pb_grpc
from grpc_service.interceptors import ErrorStatusInterceptor, SharedSecretInterceptor
from grpc_service.request_logging import RequestLogInterceptor
from grpc_service.servicer import ImageGenerationServicer
from grpc_service.streams import StreamLimitInterceptor, StreamLimits
from grpc_service.tls import TlsError, TlsIdentity, ensure_self_signed, load_identity
from mlx_sd.engine import Engine, create_engine

# Room for a batch of large PNGs in one response, for big upload chunks, and for a Draw Things request
# carrying 2048x2048 fp16 tensors (24 MiB each, uncompressed).
MAX_RECEIVE_MESSAGE_BYTES = 64 * 1024**2
MAX_SEND_MESSAGE_BYTES = 256 * 1024**2
# Threads for unary calls beside every stream the stream limits allow (grpc_service.streams).
UNARY_THREADS = 16
# Connections: a connection with no call in flight for CONNECTION_IDLE_S is closed (clients reconnect
# as they need), one that has not finished its handshake within HANDSHAKE_S too, and at most
# MAX_CONNECTIONS are open, or half the descriptors the process may open, if fewer, so that files
# can still be opened whatever clients do.
CONNECTION_IDLE_S = 120.0
HANDSHAKE_S = 10.0
MAX_CONNECTIONS = 1000
SHUTDOWN_GRACE_SECONDS = 5.0
# After the grace, how long cancelled generations get to end with a status of their own (they stop at
# their next step) before gRPC cancels them outright, and how long the MLX thread gets to end.
SHUTDOWN_CANCEL_SECONDS = 5.0
WORKER_JOIN_SECONDS = 30.0
# Once the MLX thread has stopped, the time a cancelled generation's RPC gets to send its UNAVAILABLE
# before gRPC cuts the remaining calls off.
ERROR_DELIVERY_SECONDS = 1.0

log = logging.getLogger(__name__)


class ServerStartError(Exception):
    """The server cannot start as configured (TLS material, address); the message says why."""


@dataclass(frozen=True)
class ServerSettings:
    models_dir: Path
    config_dir: Path  # holds the generated TLS pair when no certificate is given
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT  # 0 picks a free port
    tls: bool = True
    tls_cert: Path | None = None
    tls_key: Path | None = None
    shared_secret: str | None = None
    response_compression: bool = True  # gzip for the documented API, fpzip for Draw Things' tensors
    model_browser: bool = False  # Draw Things' Echo lists the models the server can load
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    cache_dir: Path | None = None  # converted weights, reused while their source is unchanged
    max_queued: int = 8  # generations waiting behind the running one; more get RESOURCE_EXHAUSTED
    dtype: str | None = None  # how weights are held: float32/float16/bfloat16; None: float16 on Metal, float32 on CPU
    quantize_bits: int | None = None  # 4 or 8: quantize the UNet's and text encoder's linear layers
    low_memory: bool = False  # free the text encoder between prompt encodings (needs cache_dir)
    pad_attention_heads: bool = False  # pad attention heads to a size MLX's fused Metal kernel takes
    prediction_type: str = "auto"  # what the UNets predict: auto (per model), epsilon or v
    memory_budget: int | None = None  # bytes for weights plus a request's work; None: mlx_sd.engine.memory_budget's default
    shutdown_grace: float = SHUTDOWN_GRACE_SECONDS  # running calls may finish this long after SIGTERM
    auth_failure_limit: FailureLimit = FailureLimit()  # per-address backoff after wrong shared secrets
    stream_limits: StreamLimits = StreamLimits()  # open streams in all and per address; their idle limit
    max_connections: int | None = None  # None: MAX_CONNECTIONS, or half the descriptor limit if fewer
    connection_idle_s: float = CONNECTION_IDLE_S


@dataclass(frozen=True)
class RunningServer:
    server: grpc.Server
    address: str  # host:port actually bound
    tls: TlsIdentity | None
    models: ModelDirectory | None = None  # its unfinished uploads are discarded at stop
    engine: Engine | None = None  # stopped at stop
    shutdown_grace: float = SHUTDOWN_GRACE_SECONDS
    streams: StreamLimitInterceptor | None = None  # its watchdog is stopped at stop

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def stop(self, grace: float | None = SHUTDOWN_GRACE_SECONDS) -> None:
        """Refuses new RPCs at once and cancels queued generations; running calls get `grace` seconds
        (None: none) to finish, then are cancelled: a generation stops within a step with UNAVAILABLE.
        Returns once every call has ended, the MLX thread too, and no upload's temporary file is left."""
        if grace is None:
            self.server.stop(None)
        else:  # generations get a margin to end with UNAVAILABLE rather than being cut off by gRPC
            deadline = time.monotonic() + grace
            self.server.stop(grace + SHUTDOWN_CANCEL_SECONDS)
        if self.engine is not None and not self.engine.shutdown(grace or 0.0, timeout=WORKER_JOIN_SECONDS):
            log.warning("the generation thread did not stop within %.0f s", WORKER_JOIN_SECONDS)
        # A second stop shortens the first one's grace: other calls get theirs, but no less than a
        # cancelled generation needs to report why it ended.
        self.server.stop(None if grace is None else max(ERROR_DELIVERY_SECONDS, deadline - time.monotonic())).wait()
        if self.models is not None:
            self.models.close()
        if self.streams is not None:
            self.streams.close()


def raise_open_file_limit() -> int:
    """Raises this process's soft limit on open descriptors to its hard limit (macOS starts
    processes at 256, which a few hundred connections would use up); returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # macOS reports an unlimited hard limit but refuses a soft one above OPEN_MAX (10240).
    wanted = min(hard, 10240) if sys.platform == "darwin" or hard == resource.RLIM_INFINITY else hard
    if soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, wanted, exc)
    return soft


def default_max_connections() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(16, min(MAX_CONNECTIONS, soft // 2))


def tls_identity(settings: ServerSettings) -> TlsIdentity:
    """The given certificate and key, or the generated pair; raises ServerStartError if unusable."""
    if (settings.tls_cert is None) != (settings.tls_key is None):
        raise ServerStartError("give both --tls-cert and --tls-key, or neither")
    try:
        if settings.tls_cert is None or settings.tls_key is None:
            return ensure_self_signed(settings.config_dir)
        identity = load_identity(settings.tls_cert, settings.tls_key)
    except TlsError as exc:
        raise ServerStartError(f"TLS setup failed: {exc}") from exc
    if identity.not_after <= dt.datetime.now(dt.UTC):
        raise ServerStartError(f"the TLS certificate {settings.tls_cert} expired on {identity.not_after:%Y-%m-%d}")
    return identity


def start_server(settings: ServerSettings, engine: Engine | None = None) -> RunningServer:
    """Starts serving in background threads. `engine` defaults to the MLX pipeline over the model dir."""
    started = time.time()
    identity = tls_identity(settings) if settings.tls else None
    settings.models_dir.mkdir(parents=True, exist_ok=True)
    models = ModelDirectory(settings.models_dir, settings.max_upload_bytes)
    if removed := models.remove_stale_uploads(older_than=started):  # left by a server that was killed
        log.info("removed %d unfinished upload(s) left in %s", removed, models.root)
    # The request log goes first, so it also records the calls the later ones refuse.
    interceptors: list[grpc.ServerInterceptor] = [RequestLogInterceptor()]
    if settings.shared_secret:
        interceptors.append(SharedSecretInterceptor(
            settings.shared_secret, FailureLimiter(settings.auth_failure_limit),
            drawthings.FIELD_CREDENTIALS, drawthings.OPEN_METHODS))
    streams = StreamLimitInterceptor(settings.stream_limits)
    interceptors += [streams, ErrorStatusInterceptor(models.root)]
    server = grpc.server(
        ThreadPoolExecutor(max_workers=settings.stream_limits.max_streams + UNARY_THREADS, thread_name_prefix="rpc"),
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", MAX_RECEIVE_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_SEND_MESSAGE_BYTES),
            ("grpc.max_allowed_incoming_connections", settings.max_connections or default_max_connections()),
            ("grpc.max_connection_idle_ms", int(settings.connection_idle_s * 1000)),
            ("grpc.server_handshake_timeout_ms", int(HANDSHAKE_S * 1000)),
        ],
        compression=grpc.Compression.Gzip if settings.response_compression else grpc.Compression.NoCompression,
    )
    if engine is None:
        engine = create_engine(models.root, cache_dir=settings.cache_dir, dtype=settings.dtype,
                               quantize_bits=settings.quantize_bits, max_queued=settings.max_queued,
                               memory_budget=settings.memory_budget, low_memory=settings.low_memory,
                               pad_attention_heads=settings.pad_attention_heads,
                               prediction_type=settings.prediction_type)
    pb_grpc.add_ImageGenerationServiceServicer_to_server(ImageGenerationServicer(models, engine), server)
    wire = drawthings.WireSettings(ServerIdentifier(settings.config_dir), settings.model_browser,
                                   settings.response_compression, settings.cache_dir)
    dt_pb_grpc.add_ImageGenerationServiceServicer_to_server(drawthings.DrawThingsServicer(models, engine, wire), server)
    host = f"[{settings.host}]" if ":" in settings.host and not settings.host.startswith("[") else settings.host
    address = f"{host}:{settings.port}"
    try:
        if identity is None:
            port = server.add_insecure_port(address)
        else:
            credentials = grpc.ssl_server_credentials([(identity.key_pem, identity.cert_pem)])
            port = server.add_secure_port(address, credentials)
    except RuntimeError as exc:
        raise ServerStartError(f"cannot listen on {address}: {exc}") from exc
    if port == 0:
        raise ServerStartError(f"cannot listen on {address}")
    streams.start()
    server.start()
    return RunningServer(server, f"{host}:{port}", identity, models, engine, settings.shutdown_grace, streams)


def run_until_signalled(running: RunningServer) -> signal.Signals:
    """Blocks until SIGINT or SIGTERM, then stops the server gracefully; returns the signal."""
    received: list[signal.Signals] = []
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        received.append(signal.Signals(signum))
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(timeout=1.0):  # a timed wait keeps the main thread responsive to signals
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("received %s; stopping (grace %.0f s)", received[0].name, running.shutdown_grace)
    running.stop(running.shutdown_grace)
    return received[0]
