"""A value loaded from files and loaded again when any of them changes (path, size or mtime)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

T = TypeVar("T")


class ReloadingValue(Generic[T]):
    """`get()` returns `load()`'s value, calling it again when the files `files()` names change."""

    def __init__(self, files: Callable[[], list[Path]], load: Callable[[], T]) -> None:
        self._files, self._load = files, load
        self._value: T | None = None
        self._stamp: tuple | None = None

    def get(self) -> T:
        stamp = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in self._files())
        if self._value is None or stamp != self._stamp:
            self._value = None  # drop the old weights before the new ones arrive
            self._value, self._stamp = self._load(), stamp
        return self._value
