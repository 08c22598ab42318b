"""Bonjour: record contents, where a server is advertised, failure handling, and a round trip on loopback.

The round trips run only on 127.0.0.1 (zeroconf bound to that interface alone), so no multicast
leaves the machine. They are skipped, saying so, where loopback multicast is unavailable.
"""

from __future__ import annotations

import logging
import uuid

import pytest
from typer.testing import CliRunner

from mlx_sd import __version__

from mlx_sd.app import discovery
from mlx_sd.app.cli import app
from mlx_sd.app.discovery import (
    DRAW_THINGS_SERVICE_TYPE,
    SERVICE_TYPE,
    Advertisement,
    DiscoveredServer,
    ServiceRecord,
    advertise,
    describe,
    discover,
    drawthings_instance_name,
    drawthings_service_info,
    instance_name,
    parse_service_info,
    service_info,
    service_record,
    txt_properties,
)

FINGERPRINT = ":".join(["AB"] * 32)
LOOPBACK = "127.0.0.1"


def test_txt_record_with_tls() -> None:
    properties = txt_properties(version="1.2.3", tls=True, auth=True, fingerprint=FINGERPRINT)
    assert properties == {"txtvers": "1", "version": "1.2.3", "tls": "1", "auth": "1", "sha256": "AB" * 32}


def test_txt_record_without_tls_has_no_fingerprint() -> None:
    properties = txt_properties(version="1.2.3", tls=False, auth=False, fingerprint=None)
    assert properties == {"txtvers": "1", "version": "1.2.3", "tls": "0", "auth": "0"}


@pytest.mark.parametrize(
    "hostname, name", [("studio", "studio"), ("studio.local", "studio"), ("studio.local.", "studio"), ("", "mlx-sd")]
)
def test_instance_name_is_the_host_name(hostname: str, name: str) -> None:
    assert instance_name(hostname) == name


def test_instance_name_fits_one_dns_label() -> None:
    assert len(instance_name("x" * 100).encode()) == 63


def test_a_wildcard_server_is_advertised_everywhere_with_its_addresses(monkeypatch) -> None:
    monkeypatch.setattr(discovery, "_local_addresses", lambda ipv6: ["192.168.1.20", "10.0.0.5"])
    record = service_record("0.0.0.0", 7859, {"tls": "1"}, hostname="studio")
    assert record == ServiceRecord("studio", 7859, ("192.168.1.20", "10.0.0.5"), {"tls": "1"}, None)


def test_a_wildcard_server_without_a_reachable_address_is_not_advertised(monkeypatch) -> None:
    monkeypatch.setattr(discovery, "_local_addresses", lambda ipv6: [])
    assert service_record("0.0.0.0", 7859, {}, hostname="studio") is None


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_a_loopback_server_is_advertised_on_loopback_only(host: str) -> None:
    record = service_record(host, 7859, {}, hostname="studio")
    assert record.addresses == (LOOPBACK,) and record.interfaces == (LOOPBACK,)


def test_a_server_on_one_address_is_advertised_on_that_interface() -> None:
    record = service_record("192.168.1.20", 7859, {}, hostname="studio")
    assert record.addresses == ("192.168.1.20",) and record.interfaces == ("192.168.1.20",)


def test_an_ipv6_loopback_server_is_not_advertised(caplog) -> None:
    caplog.set_level(logging.INFO, "mlx_sd.app.discovery")
    assert advertise("::1", 7859, tls_fingerprint=None, auth=False) is None
    assert "not advertised" in caplog.text


def test_service_info_contents() -> None:
    record = ServiceRecord(
        "studio", 7859, ("192.168.1.20",), txt_properties(version="1", tls=True, auth=False, fingerprint=FINGERPRINT)
    )
    info = service_info(record)
    assert info.type == SERVICE_TYPE == "_mlx-sd._tcp.local."
    assert info.name == "studio._mlx-sd._tcp.local."
    assert info.port == 7859 and info.parsed_addresses() == ["192.168.1.20"]
    assert info.server == "studio-mlx-sd.local."  # not the machine's own <host>.local
    assert info.properties[b"tls"] == b"1" and info.properties[b"sha256"] == b"AB" * 32
    assert parse_service_info(info) == DiscoveredServer("studio", ("192.168.1.20",), 7859, True, False, "1", "AB" * 32)


@pytest.mark.parametrize(("tls", "name"), [(True, "studio_tls"), (False, "studio_notls")])
def test_the_draw_things_record_says_tls_in_its_name(tls: bool, name: str) -> None:
    properties = txt_properties(version="1", tls=tls, auth=True, fingerprint=FINGERPRINT if tls else None)
    info = drawthings_service_info(ServiceRecord("studio", 7859, ("192.168.1.20",), properties))
    assert info.type == DRAW_THINGS_SERVICE_TYPE == "_dt-grpc._tcp.local."
    assert info.name == f"{name}._dt-grpc._tcp.local."
    assert info.port == 7859 and info.parsed_addresses() == ["192.168.1.20"]
    assert info.properties == {b"txtvers": b"1"}
    assert info.server == "studio-mlx-sd.local."


def test_the_draw_things_name_fits_one_dns_label() -> None:
    name = drawthings_instance_name("x" * 63, tls=False)
    assert name == "x" * 57 + "_notls" and len(name.encode()) == 63


def test_the_advertised_name_can_be_chosen(monkeypatch) -> None:
    registered = []
    monkeypatch.setattr(discovery, "Advertisement", registered.append)
    advertise("127.0.0.1", 7859, tls_fingerprint=None, auth=False, name="Studio Mac")
    assert [record.instance for record in registered] == ["Studio Mac"]


def test_registration_failure_only_warns(monkeypatch, caplog) -> None:
    def no_multicast(interfaces, ipv6):
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(discovery, "_zeroconf", no_multicast)
    caplog.set_level(logging.WARNING, "mlx_sd.app.discovery")
    advertisement = Advertisement(ServiceRecord("studio", 7859, (LOOPBACK,), {}, (LOOPBACK,)))
    assert advertisement.wait() is False
    advertisement.close()
    assert "Bonjour advertisement failed" in caplog.text and "Network is unreachable" in caplog.text


def test_describe_gives_the_command_to_connect() -> None:
    tls = DiscoveredServer("studio", ("192.168.1.20",), 7859, True, True, "0.1.0", "AB" * 32)
    assert describe(tls) == [
        "studio  192.168.1.20:7859  TLS  secret required  mlx-sd 0.1.0",
        f"  mlx-sd echo --server 192.168.1.20:7859 --fingerprint {'AB' * 32}",
    ]
    plain = DiscoveredServer("studio", ("fe80::1",), 7859, False, False, "", None)
    assert describe(plain)[1] == "  mlx-sd echo --server [fe80::1]:7859 --no-tls"


@pytest.fixture
def advertised() -> ServiceRecord:
    """A record with a unique name, advertised on loopback for the test."""
    properties = txt_properties(version=__version__, tls=True, auth=True, fingerprint=FINGERPRINT)
    record = service_record(LOOPBACK, 7859, properties, hostname=f"test-{uuid.uuid4().hex[:8]}")
    advertisement = Advertisement(record)
    if not advertisement.wait():
        pytest.skip("multicast on the loopback interface is unavailable here")
    yield record
    advertisement.close()


def test_round_trip_on_loopback(advertised: ServiceRecord) -> None:
    servers = {server.name: server for server in discover(1.5, [LOOPBACK])}
    assert servers[advertised.instance] == DiscoveredServer(
        advertised.instance, (LOOPBACK,), 7859, True, True, __version__, "AB" * 32
    )


def test_draw_things_clients_find_the_server_on_loopback(advertised: ServiceRecord) -> None:
    zeroconf = discovery._zeroconf([LOOPBACK], ipv6=False)
    try:
        name = f"{advertised.instance}_tls.{DRAW_THINGS_SERVICE_TYPE}"
        info = zeroconf.get_service_info(DRAW_THINGS_SERVICE_TYPE, name, timeout=3000)
    finally:
        zeroconf.close()
    assert info is not None and info.port == 7859 and info.parsed_addresses() == [LOOPBACK]
    assert info.properties == {b"txtvers": b"1"}


def test_discover_command_on_loopback(advertised: ServiceRecord) -> None:
    result = CliRunner().invoke(app, ["discover", "--timeout", "1.5", "--interface", LOOPBACK])
    assert result.exit_code == 0, result.output
    assert f"{advertised.instance}  127.0.0.1:7859  TLS  secret required  mlx-sd {__version__}" in result.stdout
