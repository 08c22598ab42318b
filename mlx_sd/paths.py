"""Default directories. Computed when called (never at import), so flags and tests can override them."""

from __future__ import annotations

import sys
from pathlib import Path

import platformdirs

APP_NAME = "mlx-sd"

# Draw Things keeps its models here; sharing the folder lets both apps use the same files.
_DRAW_THINGS_MODELS = Path("Library/Containers/com.liuliu.draw-things/Data/Documents/Models")


def default_models_dir() -> Path:
    """macOS: Draw Things' model folder; elsewhere: <user data dir>/mlx-sd/Models (XDG on Linux)."""
    if sys.platform == "darwin":
        return Path.home() / _DRAW_THINGS_MODELS
    return Path(platformdirs.user_data_dir(APP_NAME, appauthor=False)) / "Models"


def models_dir_help() -> str:
    """The default model directory as a rule, for --help texts (reads no environment)."""
    if sys.platform == "darwin":
        return f"~/{_DRAW_THINGS_MODELS}"
    if sys.platform.startswith("linux"):
        return "$XDG_DATA_HOME/mlx-sd/Models, usually ~/.local/share/mlx-sd/Models"
    return "the user data folder's mlx-sd/Models"


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
