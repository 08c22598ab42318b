"""Draw Things' protocol on our server, through the independent test client (tests/dt_client):
Echo, shared secrets in request fields, FilesExist, the bidirectional upload, Pubkey and Hours."""

from __future__ import annotations

import hashlib
from pathlib import Path

import grpc
import pytest

from grpc_service.auth import bearer_metadata

SECRET = "s3cret-phrase"


def test_echo_says_hello_with_an_identifier_kept_across_restarts(server_factory, dt_connect) -> None:
    first = dt_connect(server_factory(tls=False)).echo("iPad")
    assert first.message == "HELLO iPad" and not first.sharedSecretMissing
    assert first.serverIdentifier != 0
    again = dt_connect(server_factory(tls=False)).echo("Mac")  # a second server of the same installation
    assert again.serverIdentifier == first.serverIdentifier
    assert not first.files and not first.HasField("override")  # model browsing is off by default


def test_echo_reports_a_missing_or_wrong_secret_and_nothing_else(server_factory, dt_connect) -> None:
    client = dt_connect(server_factory(shared_secret=SECRET))
    for secret in (None, "wrong"):
        reply = client.echo("phone", secret)
        assert reply.sharedSecretMissing
        assert reply.message == "" and reply.serverIdentifier == 0 and not reply.files
    assert client.echo("phone", SECRET).message == "HELLO phone"


def test_the_secret_in_metadata_still_works(server_factory, dt_connect) -> None:
    client = dt_connect(server_factory(shared_secret=SECRET), metadata=bearer_metadata(SECRET))
    assert client.echo("meta").message == "HELLO meta"
    assert list(client.files_exist(["absent.safetensors"]).existences) == [False]


def test_other_rpcs_without_the_secret_are_unauthenticated(server_factory, dt_connect) -> None:
    client = dt_connect(server_factory(shared_secret=SECRET))
    with pytest.raises(grpc.RpcError) as caught:
        client.files_exist(["a.safetensors"], secret="wrong")
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as caught:
        list(client.generate(client.pb.GenerateRequest(prompt="x")))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as caught:
        list(client.upload_stream(iter(client.upload_messages("m.bin", b"abc", 2))))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert list(client.files_exist(["a.safetensors"], secret=SECRET).existences) == [False]


def test_an_upload_needs_the_secret_in_every_message(server_factory, dt_connect, models_dir: Path) -> None:
    client = dt_connect(server_factory(shared_secret=SECRET))
    messages = client.upload_messages("m.bin", b"abcdef", 2, secret=SECRET)
    messages[2].ClearField("sharedSecret")
    with pytest.raises(grpc.RpcError) as caught:
        list(client.upload_stream(iter(messages)))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert not (models_dir / "m.bin").exists()
    replies = list(client.upload_stream(iter(client.upload_messages("m.bin", b"abcdef", 2, secret=SECRET))))
    assert [r.receivedOffset for r in replies] == [0, 2, 4, 6]
    assert (models_dir / "m.bin").read_bytes() == b"abcdef"


def test_wrong_secrets_in_fields_count_towards_the_backoff(server_factory, dt_connect) -> None:
    from grpc_service.auth import FailureLimit

    client = dt_connect(server_factory(shared_secret=SECRET, auth_failure_limit=FailureLimit(max_failures=2)))
    for _ in range(2):
        assert client.echo("x", "wrong").sharedSecretMissing
    with pytest.raises(grpc.RpcError) as caught:
        client.echo("x", SECRET)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_echo_without_a_secret_is_a_probe_not_a_failure(server_factory, dt_connect) -> None:
    from grpc_service.auth import FailureLimit

    client = dt_connect(server_factory(shared_secret=SECRET, auth_failure_limit=FailureLimit(max_failures=2)))
    for _ in range(3):
        assert client.echo("probe").sharedSecretMissing
    assert client.echo("x", SECRET).message == "HELLO x"


def test_pubkey_and_hours_answer_empty_even_without_the_secret(server_factory, dt_connect) -> None:
    client = dt_connect(server_factory(shared_secret=SECRET))
    for rpc in ("Pubkey", "Hours"):
        assert client._unary(rpc, client.pb.Empty(), client.pb.Empty) == client.pb.Empty()


def test_files_exist_answers_per_name_with_hashes_for_those_asked(server_factory, dt_connect, models_dir: Path) -> None:
    (models_dir / "sub").mkdir()
    (models_dir / "sub" / "a.safetensors").write_bytes(b"model a")
    (models_dir / "b.ckpt").write_bytes(b"model b")
    client = dt_connect(server_factory(tls=False))
    names = ["sub/a.safetensors", "b.ckpt", "absent.ckpt", "../escape", "/etc/passwd"]
    reply = client.files_exist(names, with_hash=["sub/a.safetensors", "absent.ckpt", "../escape"])
    assert list(reply.files) == names
    assert list(reply.existences) == [True, True, False, False, False]
    assert list(reply.hashes) == [hashlib.sha256(b"model a").digest(), b"", b"", b"", b""]


def test_files_exist_bounds_the_names_per_call(server_factory, dt_connect) -> None:
    from grpc_service.files import MAX_NAMES_PER_CALL

    client = dt_connect(server_factory(tls=False))
    with pytest.raises(grpc.RpcError) as caught:
        client.files_exist([f"m{i}.ckpt" for i in range(MAX_NAMES_PER_CALL // 2)],
                           with_hash=[f"m{i}.ckpt" for i in range(MAX_NAMES_PER_CALL // 2 + 1)])
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "files" in caught.value.details()


def test_an_upload_is_acknowledged_chunk_by_chunk_and_lands_whole(server_factory, dt_connect, models_dir) -> None:
    client = dt_connect(server_factory(tls=False))
    data = bytes(range(256)) * 41  # 10496 bytes: 10 chunks of 1 KiB and a partial one
    replies = list(client.upload_stream(iter(client.upload_messages("up/model.safetensors", data, 1024))))
    assert replies[0].chunkUploadSuccess and replies[0].filename == "up/model.safetensors"
    assert [r.receivedOffset for r in replies[1:]] == [min(o + 1024, len(data)) for o in range(0, len(data), 1024)]
    assert all(r.chunkUploadSuccess for r in replies)
    assert (models_dir / "up" / "model.safetensors").read_bytes() == data
    assert not [p for p in models_dir.rglob("*") if p.name.endswith(".part")]


def test_a_chunk_at_the_wrong_offset_is_data_loss_and_nothing_is_kept(server_factory, dt_connect, models_dir) -> None:
    client = dt_connect(server_factory(tls=False))
    messages = client.upload_messages("m.safetensors", b"x" * 4096, 1024, skip_at=2048)
    acks = []
    with pytest.raises(grpc.RpcError) as caught:
        for reply in client.upload_stream(iter(messages)):
            acks.append(reply.receivedOffset)
    assert caught.value.code() == grpc.StatusCode.DATA_LOSS and "offset" in caught.value.details()
    assert acks == [0, 1024, 2048]  # the init, then the two chunks before the gap
    assert not (models_dir / "m.safetensors").exists()
    assert not [p for p in models_dir.rglob("*") if p.is_file()]


@pytest.mark.parametrize(("change", "code", "named"), [
    ("hash", grpc.StatusCode.DATA_LOSS, "sha256"),
    ("short", grpc.StatusCode.INVALID_ARGUMENT, "totalSize"),
    ("long", grpc.StatusCode.INVALID_ARGUMENT, "totalSize"),
    ("no init", grpc.StatusCode.INVALID_ARGUMENT, "initRequest"),
    ("bad hash size", grpc.StatusCode.INVALID_ARGUMENT, "sha256"),
    ("unsafe name", grpc.StatusCode.INVALID_ARGUMENT, "filename"),
])
def test_an_upload_that_does_not_add_up_is_refused(server_factory, dt_connect, models_dir, change, code, named) -> None:
    client = dt_connect(server_factory(tls=False))
    messages = client.upload_messages("m.safetensors", b"abcdefgh", 4)
    init = messages[0].initRequest
    if change == "hash":
        init.sha256 = hashlib.sha256(b"other").digest()
    elif change == "short":
        init.totalSize = 9
    elif change == "long":
        init.totalSize = 6
    elif change == "no init":
        messages = messages[1:]
    elif change == "bad hash size":
        init.sha256 = b"\x01" * 16
    elif change == "unsafe name":
        init.filename = "../outside.safetensors"
    with pytest.raises(grpc.RpcError) as caught:
        list(client.upload_stream(iter(messages)))
    assert caught.value.code() == code and named in caught.value.details()
    assert not [p for p in models_dir.parent.rglob("*.safetensors")]
    assert not [p for p in models_dir.rglob("*") if p.is_file()]


def test_the_request_log_names_draw_things_calls_and_keeps_secrets_out(server_factory, dt_connect, caplog) -> None:
    import logging

    client = dt_connect(server_factory(shared_secret=SECRET))
    with caplog.at_level(logging.DEBUG, logger="mlx_sd.requests"):
        client.files_exist(["a.safetensors", "b.ckpt"], with_hash=["b.ckpt"], secret=SECRET)
        client.echo("x", "wrong")
    lines = [r.getMessage() for r in caplog.records if r.name == "mlx_sd.requests"]
    assert any("DrawThings/FilesExist" in line and "files=2 hashes=1" in line and "-> OK" in line for line in lines)
    assert any("DrawThings/Echo" in line and "-> OK" in line for line in lines)
    assert not any(SECRET in line or "wrong" in line for line in lines)
