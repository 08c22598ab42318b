"""Bonjour (mDNS/DNS-SD): the server advertises itself, `mlx-sd discover` lists the servers it hears.

Service type `_mlx-sd._tcp.local.`; instance name: the server's name (the host name unless
`serve --name` gives one). TXT keys:
  txtvers=1, version=<mlx-sd version>, tls=1|0, auth=1|0 (1: a shared secret is required),
  sha256=<the certificate's SHA-256 fingerprint, hex without colons> (with TLS only).

The same port is also advertised as Draw Things' own server does, so that Draw Things clients list
it: service type `_dt-grpc._tcp.local.`, instance name `<name>_tls` or `<name>_notls` (the clients
read TLS from that suffix), TXT `txtvers=1`.

zeroconf is imported inside the functions that use it, so the CLI stays quick to start.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

import typer

from mlx_sd import __version__

if TYPE_CHECKING:
    from zeroconf import ServiceInfo

SERVICE_TYPE = "_mlx-sd._tcp.local."
DRAW_THINGS_SERVICE_TYPE = "_dt-grpc._tcp.local."
TXT_VERSION = "1"
RESOLVE_TIMEOUT_MS = 1500
CLOSE_WAIT_S = 5.0  # registration probes for about 2 s; wait for it before withdrawing the records

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServiceRecord:
    """What the server advertises, and where: `interfaces` None means every interface."""

    instance: str
    port: int
    addresses: tuple[str, ...]
    properties: Mapping[str, str]
    interfaces: tuple[str, ...] | None = None
    ipv6: bool = False


def txt_properties(*, version: str, tls: bool, auth: bool, fingerprint: str | None) -> dict[str, str]:
    properties = {"txtvers": TXT_VERSION, "version": version, "tls": "1" if tls else "0", "auth": "1" if auth else "0"}
    if tls and fingerprint:
        properties["sha256"] = fingerprint.replace(":", "").upper()
    return properties


def instance_name(hostname: str) -> str:
    """The host name without a trailing .local, cut to one DNS label (63 bytes)."""
    name = hostname.removesuffix(".").removesuffix(".local") or "mlx-sd"
    return name.encode()[:63].decode(errors="ignore")


def _local_addresses(ipv6: bool) -> list[str]:
    """This host's interface addresses that other hosts can reach (no loopback or link-local ones)."""
    import ifaddr  # zeroconf's own dependency

    found = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            text = ip.ip if isinstance(ip.ip, str) else ip.ip[0]
            address = ipaddress.ip_address(text)
            if address.version == 6 and not ipv6:
                continue
            if not (address.is_loopback or address.is_link_local):
                found.append(str(address))
    return found


def service_record(
    host: str, port: int, properties: Mapping[str, str], hostname: str | None = None
) -> ServiceRecord | None:
    """The record for a server listening on `host`, advertised only where it can be reached.

    A wildcard host is advertised on every interface with their addresses; a specific address
    only on its own interface (so a loopback server is announced on loopback alone). None when
    there is nothing to advertise (an IPv6 loopback server, or a host with no usable address).
    """
    name = instance_name(hostname if hostname is not None else socket.gethostname())
    try:
        address = ipaddress.ip_address(host.strip("[]")) if host else ipaddress.ip_address("0.0.0.0")
    except ValueError:
        address = ipaddress.ip_address(socket.gethostbyname(host))  # a host name: IPv4, as grpc binds it
    if address.is_unspecified:
        addresses = tuple(_local_addresses(ipv6=address.version == 6))
        if not addresses:
            return None
        return ServiceRecord(name, port, addresses, dict(properties), None, ipv6=address.version == 6)
    if address.version == 6:
        if address.is_loopback:
            return None
        return ServiceRecord(name, port, (str(address),), dict(properties), None, ipv6=True)
    return ServiceRecord(name, port, (str(address),), dict(properties), (str(address),))


def _server_name(record: ServiceRecord) -> str:
    """A host name of our own: answering for the machine's <host>.local could clash with the
    system's responder, which owns that name."""
    label = record.instance.split(".")[0].replace(" ", "-") or "mlx-sd"
    return f"{label}-mlx-sd.local."


def service_info(record: ServiceRecord) -> ServiceInfo:
    from zeroconf import ServiceInfo

    return ServiceInfo(
        SERVICE_TYPE,
        f"{record.instance}.{SERVICE_TYPE}",
        port=record.port,
        properties=dict(record.properties),
        server=_server_name(record),
        parsed_addresses=list(record.addresses),
    )


def drawthings_instance_name(instance: str, tls: bool) -> str:
    """`<name>_tls` or `<name>_notls`, the name cut so the whole stays one DNS label."""
    suffix = "_tls" if tls else "_notls"
    return instance.encode()[: 63 - len(suffix)].decode(errors="ignore") + suffix


def drawthings_service_info(record: ServiceRecord) -> ServiceInfo:
    """The record as Draw Things' server advertises itself, on the same host and port."""
    from zeroconf import ServiceInfo

    instance = drawthings_instance_name(record.instance, record.properties.get("tls") == "1")
    return ServiceInfo(
        DRAW_THINGS_SERVICE_TYPE,
        f"{instance}.{DRAW_THINGS_SERVICE_TYPE}",
        port=record.port,
        properties={"txtvers": TXT_VERSION},
        server=_server_name(record),
        parsed_addresses=list(record.addresses),
    )


def _zeroconf(interfaces: Sequence[str] | None, ipv6: bool) -> Any:
    from zeroconf import InterfaceChoice, IPVersion, Zeroconf

    return Zeroconf(
        interfaces=list(interfaces) if interfaces else InterfaceChoice.All,
        ip_version=IPVersion.All if ipv6 else IPVersion.V4Only,
    )


@dataclass
class Advertisement:
    """Registers a record in a background thread, so the server never waits for the network.

    A failure (no multicast route, a firewall, a sandbox) is logged as a warning and nothing else.
    """

    record: ServiceRecord
    _zeroconf: Any = field(default=None, init=False)
    _infos: list[Any] = field(default_factory=list, init=False)
    _thread: threading.Thread = field(init=False)

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self._register, name="bonjour", daemon=True)
        self._thread.start()

    def _register(self) -> None:
        zeroconf = None
        infos = []
        try:
            zeroconf = _zeroconf(self.record.interfaces, self.record.ipv6)
            for info in (service_info(self.record), drawthings_service_info(self.record)):
                zeroconf.register_service(info, allow_name_change=True)
                infos.append(info)
        except Exception as exc:  # whatever the network does, the server keeps serving
            log.warning("Bonjour advertisement failed; clients need the address given to them: %s", exc)
            if zeroconf is not None:
                zeroconf.close()
            return
        self._zeroconf, self._infos = zeroconf, infos
        addresses = ", ".join(self.record.addresses)
        names = " and ".join(repr(info.name) for info in infos)
        log.info("advertised as %s at %s port %d", names, addresses, self.record.port)

    @property
    def registered(self) -> bool:
        return bool(self._infos)

    def wait(self, timeout: float = CLOSE_WAIT_S) -> bool:
        """Waits for the registration attempt to end; True if the record is now registered."""
        self._thread.join(timeout)
        return self.registered

    def close(self) -> None:
        """Withdraws the record (a goodbye packet, so browsers drop it at once)."""
        if self.wait() and self._zeroconf is not None:
            try:
                for info in self._infos:
                    self._zeroconf.unregister_service(info)
            finally:
                self._zeroconf.close()
            self._zeroconf, self._infos = None, []


def advertise(host: str, port: int, *, tls_fingerprint: str | None, auth: bool,
              name: str | None = None) -> Advertisement | None:
    """Starts advertising a server on host:port (TLS when it has a certificate fingerprint) under
    `name` (default: the host name); None, logged, when there is nothing to announce."""
    tls = tls_fingerprint is not None
    properties = txt_properties(version=__version__, tls=tls, auth=auth, fingerprint=tls_fingerprint)
    try:
        record = service_record(host, port, properties, hostname=name)
    except (OSError, ValueError) as exc:
        log.warning("not advertised with Bonjour: %s", exc)
        return None
    if record is None:
        log.info("not advertised with Bonjour: no address other hosts can reach for %s", host)
        return None
    return Advertisement(record)


@dataclass(frozen=True)
class DiscoveredServer:
    name: str
    addresses: tuple[str, ...]
    port: int
    tls: bool | None  # None: the record did not say
    auth: bool | None
    version: str
    fingerprint: str | None

    @property
    def server(self) -> str:
        """host:port for --server, from the first address."""
        if not self.addresses:
            return f"?:{self.port}"
        host = self.addresses[0]
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"


def _flag(properties: Mapping[bytes, bytes | None], key: bytes) -> bool | None:
    value = properties.get(key)
    return None if value is None else value == b"1"


def parse_service_info(info: ServiceInfo) -> DiscoveredServer:
    properties = info.properties
    fingerprint = properties.get(b"sha256")
    version = properties.get(b"version")
    return DiscoveredServer(
        name=info.name.removesuffix("." + SERVICE_TYPE),
        addresses=tuple(info.parsed_addresses()),
        port=info.port or 0,
        tls=_flag(properties, b"tls"),
        auth=_flag(properties, b"auth"),
        version=version.decode(errors="replace") if version else "",
        fingerprint=fingerprint.decode(errors="replace") if fingerprint else None,
    )


def discover(timeout: float, interfaces: Sequence[str] | None = None) -> list[DiscoveredServer]:
    """The servers that answer within `timeout` seconds, by name; `interfaces` None browses all."""
    from zeroconf import ServiceBrowser, ServiceStateChange

    names: set[str] = set()
    lock = threading.Lock()

    def on_change(zeroconf: Any, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        with lock:
            if state_change is ServiceStateChange.Removed:
                names.discard(name)
            else:
                names.add(name)

    zeroconf = _zeroconf(interfaces, ipv6=False)
    try:
        browser = ServiceBrowser(zeroconf, SERVICE_TYPE, handlers=[on_change])
        try:
            time.sleep(timeout)
        finally:
            browser.cancel()
        with lock:
            found = sorted(names)
        infos = [zeroconf.get_service_info(SERVICE_TYPE, name, timeout=RESOLVE_TIMEOUT_MS) for name in found]
    finally:
        zeroconf.close()
    return [parse_service_info(info) for info in infos if info is not None]


def describe(server: DiscoveredServer) -> list[str]:
    """Lines for `mlx-sd discover`: what the server is, then how to reach it."""
    transport = {True: "TLS", False: "plaintext", None: "TLS unknown"}[server.tls]
    secret = {True: "secret required", False: "no secret", None: "secret unknown"}[server.auth]
    version = f"mlx-sd {server.version}" if server.version else "version unknown"
    lines = [f"{server.name}  {server.server}  {transport}  {secret}  {version}"]
    if server.tls is False:
        trust = " --no-tls"
    elif server.fingerprint:
        trust = f" --fingerprint {server.fingerprint}"
    else:
        trust = ""
    lines.append(f"  mlx-sd echo --server {server.server}{trust}")
    return lines


def discover_command(
    timeout: Annotated[float, typer.Option(help="Seconds to listen for answers.", min=0.1)] = 3.0,
    interface: Annotated[
        list[str] | None,
        typer.Option(help="Listen only on the interface with this IPv4 address (repeatable); default: all."),
    ] = None,
) -> None:
    """List the mlx-sd servers on the local network (Bonjour), with the command to reach each."""
    try:
        servers = discover(timeout, interface or None)
    except OSError as exc:
        typer.secho(f"error: cannot listen for Bonjour answers: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(1) from exc
    if not servers:
        typer.echo(f"no mlx-sd servers answered within {timeout:g} s", err=True)
    for server in servers:
        for line in describe(server):
            typer.echo(line)
