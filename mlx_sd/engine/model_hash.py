"""A file's SHA-256, remembered between starts.

Each image's parameters carry A1111's short model hash (the first 10 hex digits of the
checkpoint's SHA-256), and Draw Things clients ask for the SHA-256 of model files. Hashing a 2 GB
checkpoint takes about 2.4 s on a 2-core Xeon, several times the load itself, so the digest is
kept in the cache folder (`model-hashes.json`) beside the converted weights, keyed by the file's
fingerprint (resolved path, size, mtime and a sampled content hash, as the converted-weights cache
is), and computed again only when the file changes. Any file can be hashed, not only safetensors.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from convert.cache import file_fingerprint

log = logging.getLogger(__name__)

HASHES_FILE = "model-hashes.json"
_CHUNK = 16 * 1024 * 1024
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: Path, cache_dir: Path | None) -> bytes:
    """The 32-byte SHA-256 of `path`, from `cache_dir`'s record where the file is unchanged since
    it was hashed (no record is kept without a cache folder)."""
    if cache_dir is None:
        return bytes.fromhex(sha256_of(path))
    identity = file_fingerprint(path)
    records = _read(cache_dir / HASHES_FILE)
    record = records.get(identity["path"])
    if isinstance(record, dict) and {key: record.get(key) for key in identity} == identity:
        digest = record.get("sha256")
        if isinstance(digest, str) and _SHA256_HEX.fullmatch(digest):
            return bytes.fromhex(digest)
    digest = sha256_of(path)
    # Records of files that are gone are dropped, so the file does not grow without bound.
    records = {key: value for key, value in records.items() if Path(key).is_file()}
    records[identity["path"]] = identity | {"sha256": digest}
    try:
        _write(cache_dir / HASHES_FILE, records)
    except OSError as e:  # an unwritable cache only costs the hashing next time
        log.warning("could not remember the SHA-256 of %s in %s: %s", path.name, cache_dir, e)
    return bytes.fromhex(digest)


def short_model_hash(path: Path, cache_dir: Path | None) -> str:
    """A1111's short model hash: the first 10 hex digits of `path`'s SHA-256 (see file_sha256)."""
    return file_sha256(path, cache_dir).hex()[:10]


def _read(path: Path) -> dict[str, Any]:
    try:
        records = json.loads(path.read_text())
    except (OSError, ValueError):  # absent, unreadable or damaged: hash again
        return {}
    return records if isinstance(records, dict) else {}


def _write(path: Path, records: dict[str, Any]) -> None:
    """Replace `path` whole, so that a concurrent reader sees the old records or the new ones."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as f:
            json.dump(records, f, indent=1)
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)
