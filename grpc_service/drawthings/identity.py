"""The server identifier Draw Things clients use to tell servers apart (EchoReply.serverIdentifier).

A random uint64, drawn when a Draw Things client first asks and kept in the config folder, so one
installation answers the same number across restarts. Nothing is written for servers no such client
talks to.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import tempfile
import threading
from pathlib import Path

IDENTIFIER_FILE = "server-identifier"

log = logging.getLogger(__name__)


class ServerIdentifier:
    def __init__(self, config_dir: Path) -> None:
        self._path = config_dir / IDENTIFIER_FILE
        self._lock = threading.Lock()
        self._value: int | None = None

    def get(self) -> int:
        with self._lock:
            if self._value is None:
                stored = self._read()
                self._value = stored if stored is not None else self._create()
            return self._value

    def _read(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            value = int(self._path.read_text().strip())
            if 0 <= value < 2**64:
                return value
        return None

    def _create(self) -> int:
        value = secrets.randbits(64)
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(prefix=f".{IDENTIFIER_FILE}.", dir=self._path.parent)
            try:
                with os.fdopen(handle, "w") as f:
                    f.write(f"{value}\n")
                os.replace(temporary, self._path)  # whole or not at all
            finally:
                Path(temporary).unlink(missing_ok=True)
        except OSError as exc:  # the identifier then changes at the next start, nothing worse
            log.warning("could not keep the server identifier in %s: %s", self._path, exc)
        return value
