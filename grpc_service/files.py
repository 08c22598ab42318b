"""Safe access to the model directory: name checks for FilesExist, and atomic uploads.

A client names files relative to the model directory. A name is refused when it breaks the rules
of `mlx_sd.engine.model_names` (empty, absolute, a `..`, `.` or empty component, a NUL, over-long) or
resolves (through symlinks) to a place outside the directory. Refused names are never opened, written or reported on.

An upload lives in a hidden temporary file until it is complete (and matches its SHA-256, when
one was declared); only then is it renamed over its target, so the target is never partial.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from mlx_sd.engine.errors import ChecksumMismatch, InvalidRequest, ShuttingDown, StorageFull
from mlx_sd.engine.model_names import name_problem, shown_name

MAX_NAMES_PER_CALL = 1000  # bounds one FilesExist call's work (each name costs a path resolution)
DEFAULT_MAX_UPLOAD_BYTES = 8 * 1024**3
UPLOAD_TEMP_PREFIX = ".mlx-sd-upload-"
UPLOAD_TEMP_SUFFIX = ".part"
_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)

log = logging.getLogger(__name__)


class UnsafePath(InvalidRequest):
    """A client-supplied file name that the model directory refuses; `reason` says why."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__("filename", f"{name!r} {reason}")
        self.reason = reason


@dataclass(frozen=True)
class FileCheck:
    """FilesExist's answer for one name; `error` is "" unless the name was refused."""

    name: str
    exists: bool
    error: str = ""


class ModelDirectory:
    """The folder that holds the models; every client-supplied name goes through `resolve`."""

    def __init__(self, root: Path, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES) -> None:
        self.root = root.resolve()
        self.max_upload_bytes = max_upload_bytes
        self._lock = threading.Lock()  # guards the two fields below
        self._uploads: set[AtomicUpload] = set()  # in progress, so that close() can discard them
        self._closed = False

    def resolve(self, name: str) -> Path:
        """The real path that `name` denotes inside the directory; raises UnsafePath otherwise."""
        _check_name_syntax(name)
        try:
            real = Path(os.path.realpath(self.root / name))
        except (OSError, ValueError) as exc:
            raise UnsafePath(name, f"cannot be resolved ({exc})") from exc
        if self.root not in real.parents:
            raise UnsafePath(name, "leads outside the model directory")
        return real

    def check(self, name: str) -> FileCheck:
        """Whether `name` is a regular file in the directory (symlinks followed, if they stay inside)."""
        try:
            return FileCheck(name, self.resolve(name).is_file())
        except UnsafePath as exc:
            return FileCheck(name, False, exc.reason)

    def check_all(self, names: Sequence[str]) -> list[FileCheck]:
        """`check` of each name; more than MAX_NAMES_PER_CALL names is an InvalidRequest for `files`."""
        if len(names) > MAX_NAMES_PER_CALL:
            raise InvalidRequest("files", f"at most {MAX_NAMES_PER_CALL} names per call (got {len(names)})")
        return [self.check(name) for name in names]

    def start_upload(self, name: str, sha256: str = "") -> AtomicUpload:
        """A temporary file beside the target `name` (creating its folders); see AtomicUpload.

        `sha256`, when given (64 hex digits), is what the complete file must hash to.
        """
        if sha256 and not _SHA256_HEX.fullmatch(sha256):
            raise InvalidRequest("sha256", "must be 64 hexadecimal digits, or empty")
        target = self.resolve(name)
        if target.is_dir():
            raise UnsafePath(name, "names a folder")
        if _is_upload_temp(target.name):  # the next start would delete it
            raise UnsafePath(name, f"is named like an unfinished upload ({UPLOAD_TEMP_PREFIX}*{UPLOAD_TEMP_SUFFIX})")
        with _storage_errors(0):
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                if exc.errno in _DISK_FULL:
                    raise
                raise UnsafePath(name, f"cannot have its folder created ({exc.strerror})") from exc
        with self._lock:
            if self._closed:
                raise ShuttingDown("the server is shutting down; uploads are not taken")
            with _storage_errors(0):
                upload = AtomicUpload(target, self.max_upload_bytes, sha256.lower(), self._forget)
            self._uploads.add(upload)
        return upload

    def _forget(self, upload: AtomicUpload) -> None:
        with self._lock:
            self._uploads.discard(upload)

    def close(self) -> None:
        """Refuses new uploads and discards the temporary files of those still in progress."""
        with self._lock:
            self._closed = True
            uploads = list(self._uploads)
        for upload in uploads:
            upload.discard()

    def remove_stale_uploads(self, older_than: float) -> int:
        """Deletes upload temporary files (ours by their name) last modified before `older_than`
        (a time.time() value), left by a server that was killed; returns how many.

        Symlinks are neither followed into nor deleted, so nothing outside the directory is touched.
        """
        removed = 0
        for folder, _dirs, files in os.walk(self.root):  # os.walk does not descend into symlinked folders
            for name in files:
                if not _is_upload_temp(name):
                    continue
                path = os.path.join(folder, name)
                with contextlib.suppress(FileNotFoundError):
                    info = os.lstat(path)
                    if stat.S_ISREG(info.st_mode) and info.st_mtime < older_than:
                        os.unlink(path)
                        removed += 1
        return removed


def _check_name_syntax(name: str) -> None:
    reason = name_problem(name)
    if reason is not None:
        raise UnsafePath(shown_name(name), reason)


class AtomicUpload:
    """Chunks go to a hidden temporary file in the target's folder, renamed into place by `commit`.

    Leaving the `with` block without a commit (error, cancellation) deletes the temporary file, so
    the target is either absent, untouched, or complete. `discard` may also be called from another
    thread (the RPC's termination callback, or shutdown) and is idempotent.
    """

    def __init__(self, target: Path, max_bytes: int, sha256: str = "",
                 on_close: Callable[[AtomicUpload], None] | None = None) -> None:
        self.target = target
        self.max_bytes = max_bytes
        self.size = 0
        self._expected_sha256 = sha256
        self._digest = hashlib.sha256() if sha256 else None
        self._on_close = on_close
        self.temp_path, self._file = _open_temp(target.parent)
        self._committed = False

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.max_bytes:
            raise InvalidRequest("chunk_data", f"the upload exceeds the server's limit of {self.max_bytes} bytes")
        with _storage_errors(self.size):
            self._file.write(chunk)
            self._file.flush()  # chunks are large; unflushed data would only hide progress on disk
        if self._digest is not None:
            self._digest.update(chunk)

    def commit(self) -> None:
        """Checks the declared SHA-256, makes the data durable and puts it at the target in one rename."""
        if self._digest is not None and self._digest.hexdigest() != self._expected_sha256:
            raise ChecksumMismatch(f"sha256: the {self.size} bytes received hash to {self._digest.hexdigest()}, "
                                   f"not the declared {self._expected_sha256}; nothing was kept")
        with _storage_errors(self.size):
            self._file.flush()
            os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.temp_path, self.target)
        self._committed = True
        _fsync_dir(self.target.parent)

    def discard(self) -> None:
        if not self._committed:
            with contextlib.suppress(FileNotFoundError):
                self.temp_path.unlink()

    def __enter__(self) -> AtomicUpload:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        with contextlib.suppress(OSError):  # a full disk may fail the final flush; the file goes anyway
            self._file.close()
        self.discard()
        if self._on_close is not None:
            self._on_close(self)


def _open_temp(folder: Path) -> tuple[Path, BinaryIO]:
    """A new hidden temporary file in `folder`, named with our prefix so a later start can clean it up."""
    fd, temp = tempfile.mkstemp(prefix=UPLOAD_TEMP_PREFIX, suffix=UPLOAD_TEMP_SUFFIX, dir=folder)
    return Path(temp), os.fdopen(fd, "wb")


def _is_upload_temp(name: str) -> bool:
    return name.startswith(UPLOAD_TEMP_PREFIX) and name.endswith(UPLOAD_TEMP_SUFFIX)


@contextlib.contextmanager
def _storage_errors(received: int) -> Iterator[None]:
    """Turns a full disk (or quota) into StorageFull; other OS errors stay unexpected (INTERNAL)."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in _DISK_FULL:
            raise
        raise StorageFull(f"the disk holding the model directory is full ({received} bytes received); "
                          "nothing was kept") from exc


def _fsync_dir(folder: Path) -> None:
    """Persists a rename in `folder` (a no-op where folders cannot be opened, as on Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
