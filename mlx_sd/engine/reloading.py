"""A value loaded from files and loaded again when any of them changes (path, size or mtime)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

T = TypeVar("T")


class ReloadingValue(Generic[T]):
    """`get()` returns `load()`'s value, calling it again when the files `files()` names change.

    A load that fails with one of the `remembered` errors (say a malformed checkpoint) is not tried
    again until the files change: `get()` raises the same error at once."""

    def __init__(self, files: Callable[[], list[Path]], load: Callable[[], T],
                 remembered: tuple[type[Exception], ...] = ()) -> None:
        self._files, self._load, self._remembered = files, load, remembered
        self._value: T | None = None
        self._error: Exception | None = None
        self._stamp: tuple | None = None

    def get(self) -> T:
        stamp = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in self._files())
        if stamp == self._stamp:
            if self._error is not None:
                raise self._error
            if self._value is not None:
                return self._value
        self._value, self._error, self._stamp = None, None, None  # drop the old weights before the new ones arrive
        try:
            self._value = self._load()
        except self._remembered as exc:
            self._error = exc
            raise
        finally:
            self._stamp = stamp
        return self._value
