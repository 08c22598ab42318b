"""Safe access to the model directory: name checks for FilesExist, and atomic uploads.

A client names files relative to the model directory. A name is refused when it is empty,
absolute, contains a `..`, `.` or empty component, a NUL, is over-long, or resolves (through
symlinks) to a place outside the directory. Refused names are never opened, written or reported on.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath
from types import TracebackType

from mlx_sd.errors import InvalidRequest

MAX_NAME_CHARS = 1024
MAX_COMPONENT_BYTES = 255  # the usual file-system limit for one path component
DEFAULT_MAX_UPLOAD_BYTES = 8 * 1024**3
UPLOAD_TEMP_PREFIX = ".mlx-sd-upload-"
UPLOAD_TEMP_SUFFIX = ".part"


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

    def start_upload(self, name: str) -> AtomicUpload:
        """A temporary file beside the target `name` (creating its folders); see AtomicUpload."""
        target = self.resolve(name)
        if target.is_dir():
            raise UnsafePath(name, "names a folder")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UnsafePath(name, f"cannot have its folder created ({exc.strerror})") from exc
        return AtomicUpload(target, self.max_upload_bytes)


def _check_name_syntax(name: str) -> None:
    if not name:
        raise UnsafePath(name, "is empty")
    if "\0" in name:
        raise UnsafePath(name, "contains a NUL character")
    if len(name) > MAX_NAME_CHARS:
        raise UnsafePath(name[:64] + "...", f"is longer than {MAX_NAME_CHARS} characters")
    if name.startswith(("/", "\\")) or PureWindowsPath(name).drive:
        raise UnsafePath(name, "is absolute; names are relative to the model directory")
    components = name.split("/")
    # A backslash is an ordinary character here, but a client on Windows may mean a separator.
    if ".." in components or ".." in name.split("\\"):
        raise UnsafePath(name, "contains '..'")
    if any(c in ("", ".") for c in components):
        raise UnsafePath(name, "has an empty or '.' component")
    if any(len(c.encode()) > MAX_COMPONENT_BYTES for c in components):
        raise UnsafePath(name, f"has a component longer than {MAX_COMPONENT_BYTES} bytes")


class AtomicUpload:
    """Chunks go to a hidden temporary file in the target's folder, renamed into place by `commit`.

    Leaving the `with` block without a commit (error, cancellation) deletes the temporary file, so
    the target is either absent, untouched, or complete. `discard` may also be called from another
    thread (the RPC's termination callback) and is idempotent.
    """

    def __init__(self, target: Path, max_bytes: int) -> None:
        self.target = target
        self.max_bytes = max_bytes
        self.size = 0
        fd, temp = tempfile.mkstemp(prefix=UPLOAD_TEMP_PREFIX, suffix=UPLOAD_TEMP_SUFFIX, dir=target.parent)
        self.temp_path = Path(temp)
        self._file = os.fdopen(fd, "wb")
        self._committed = False

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.max_bytes:
            raise InvalidRequest("chunk_data", f"the upload exceeds the server's limit of {self.max_bytes} bytes")
        self._file.write(chunk)
        self._file.flush()  # chunks are large; unflushed data would only hide progress on disk

    def commit(self) -> None:
        """Makes the data durable and puts it at the target in one rename."""
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
        self._file.close()
        self.discard()


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
