"""Default directories. Computed when called (never at import), so flags and tests can override them."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import platformdirs

APP_NAME = "mlx-sd"

# Draw Things keeps its models here; sharing the folder lets both apps use the same files. It is
# another app's sandbox container: used where it exists, never created.
_DRAW_THINGS_MODELS = Path("Library/Containers/com.liuliu.draw-things/Data/Documents/Models")
FULL_DISK_ACCESS = "System Settings > Privacy & Security > Full Disk Access"


def own_models_dir() -> Path:
    """<user data dir>/mlx-sd/Models: ~/Library/Application Support/mlx-sd/Models on macOS, XDG on Linux."""
    return Path(platformdirs.user_data_dir(APP_NAME, appauthor=False)) / "Models"


def draw_things_models_dir(home: Path | None = None) -> Path | None:
    """Draw Things' model folder where it exists (also where privacy protection hides its contents)."""
    path = (home or Path.home()) / _DRAW_THINGS_MODELS
    try:
        return path if stat.S_ISDIR(path.stat().st_mode) else None
    except PermissionError:
        return path  # there, but unreadable: serve says which permission it needs
    except OSError:
        return None


def default_models_dir(platform: str | None = None) -> Path:
    """macOS: Draw Things' model folder where it exists, else our own; elsewhere: our own folder."""
    if (platform or sys.platform) == "darwin":
        return draw_things_models_dir() or own_models_dir()
    return own_models_dir()


def default_models_dir_note(platform: str | None = None) -> str | None:
    """Says why the default is not Draw Things' folder on a Mac without one; None elsewhere."""
    if (platform or sys.platform) == "darwin" and draw_things_models_dir() is None:
        return f"no Draw Things model folder (~/{_DRAW_THINGS_MODELS}); using mlx-sd's own, {own_models_dir()}"
    return None


def models_dir_help() -> str:
    """The default model directory as a rule, for --help texts (reads no environment)."""
    if sys.platform == "darwin":
        return f"~/{_DRAW_THINGS_MODELS} where Draw Things has it, else ~/Library/Application Support/mlx-sd/Models"
    if sys.platform.startswith("linux"):
        return "$XDG_DATA_HOME/mlx-sd/Models, usually ~/.local/share/mlx-sd/Models"
    return "the user data folder's mlx-sd/Models"


def in_app_container(path: Path) -> bool:
    """Whether a path lies in an app's sandbox container (~/Library/Containers/<app>/...)."""
    parts = path.absolute().parts
    return any(parts[i : i + 2] == ("Library", "Containers") for i in range(len(parts) - 2))


def models_dir_access_problem(path: Path) -> tuple[str, str] | None:
    """Why the models folder cannot be read, and what to do; None when it can be (or does not exist yet)."""
    try:
        with os.scandir(path) as entries:
            next(entries, None)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except PermissionError as exc:
        if in_app_container(path):
            return (
                f"cannot read {path}: macOS protects other apps' data, and a program without a window (the "
                'service) cannot answer the "would like to access data from other apps" prompt',
                f"give {Path(sys.executable).resolve()} Full Disk Access ({FULL_DISK_ACCESS}) and restart, "
                "or serve a folder of mlx-sd's own (MODELS_DIR, or models-dir in the config file)",
            )
        return f"cannot read {path}: {exc.strerror}", "check the folder's permissions or choose another MODELS_DIR"
    return None


def default_config_dir() -> Path:
    """Where the server keeps its generated TLS certificate (macOS: ~/Library/Application Support/mlx-sd)."""
    return Path(platformdirs.user_config_dir(APP_NAME, appauthor=False))


def config_dir_help() -> str:
    """The default config directory as a rule, for --help texts (reads no environment)."""
    if sys.platform == "darwin":
        return "~/Library/Application Support/mlx-sd"
    if sys.platform.startswith("linux"):
        return "$XDG_CONFIG_HOME/mlx-sd, usually ~/.config/mlx-sd"
    return "the user config folder's mlx-sd"


def default_cache_dir() -> Path:
    """Where converted weights are cached (macOS: ~/Library/Caches/mlx-sd/converted)."""
    return Path(platformdirs.user_cache_dir(APP_NAME, appauthor=False)) / "converted"
