"""The rules for a file name a client gives relative to the model directory (a request's model,
FilesExist, uploads). Pure: nothing here touches the file system; where a name leads through
symlinks is checked by whoever opens it.
"""

from __future__ import annotations

from pathlib import PureWindowsPath

MAX_NAME_CHARS = 1024
MAX_COMPONENT_BYTES = 255  # the usual file-system limit for one path component


def name_problem(name: str) -> str | None:
    """Why `name` is refused ("is empty", "contains '..'", ...), or None when it is acceptable."""
    if not name:
        return "is empty"
    if "\0" in name:
        return "contains a NUL character"
    if len(name) > MAX_NAME_CHARS:
        return f"is longer than {MAX_NAME_CHARS} characters"
    if name.startswith(("/", "\\")) or PureWindowsPath(name).drive:
        return "is absolute; names are relative to the model directory"
    components = name.split("/")
    # A backslash is an ordinary character here, but a client on Windows may mean a separator.
    if ".." in components or ".." in name.split("\\"):
        return "contains '..'"
    if any(c in ("", ".") for c in components):
        return "has an empty or '.' component"
    if any(len(c.encode()) > MAX_COMPONENT_BYTES for c in components):
        return f"has a component longer than {MAX_COMPONENT_BYTES} bytes"
    return None


def shown_name(name: str) -> str:
    """`name` cut to fit in a message."""
    return name if len(name) <= MAX_NAME_CHARS else name[:64] + "..."
