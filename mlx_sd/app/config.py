"""The settings file of `mlx-sd serve`, and the effective settings with where each came from.

The file is TOML at <user config dir>/config.toml (`mlx-sd --config FILE` picks another). Its
[serve] table holds serve's settings under the flags' names:

    [serve]
    port = 7860
    no-tls = false
    models-dir = "~/Models"

Click resolves every parameter from the command line, then its environment variable, then the
context's `default_map`, then the built-in default. `ServeCommand` loads the file into that map,
so flags (and MLX_SD_SHARED_SECRET) override the file, and the file's values pass the same type
and range checks as flags. Nothing is read at import time.
"""

from __future__ import annotations

import inspect
import tomllib
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import typer
from typer.core import TyperCommand

from mlx_sd.app.paths import default_cache_dir, default_config_dir, default_models_dir
from mlx_sd.app.serve_compat import ForeignOptionError, drop_foreign_options

CONFIG_FILE_NAME = "config.toml"
SECTION = "serve"
# Where the root command keeps the --config path; a context's meta is shared with its children.
CONFIG_FILE_META_KEY = "mlx_sd.config_file"
SECRET_SETTINGS = frozenset({"shared_secret"})
# Serve settings whose None means "this computed folder"; shown resolved, like serve uses them.
DIRECTORY_DEFAULTS: dict[str, Callable[[], Path]] = {
    "models_dir": default_models_dir,
    "config_dir": default_config_dir,
    "cache_dir": default_cache_dir,
}
# click.core.ParameterSource members by name (typer may bundle its own copy of click).
SOURCE_LABELS = {
    "COMMANDLINE": "flag",
    "ENVIRONMENT": "environment",
    "DEFAULT_MAP": "config file",
    "DEFAULT": "default",
    "PROMPT": "prompt",
}
MASK = "********"


class ConfigError(Exception):
    """The config file cannot be read or holds an unknown or mistyped setting; the message says which."""


def default_config_file() -> Path:
    return default_config_dir() / CONFIG_FILE_NAME


def config_file_of(ctx: typer.Context | None) -> Path:
    """The file chosen with the root's --config, or the default one."""
    chosen = ctx.meta.get(CONFIG_FILE_META_KEY) if ctx is not None else None
    return Path(chosen) if chosen is not None else default_config_file()


def setting_key(param_name: str) -> str:
    """The file's (and the flag's) name of a parameter: max_upload_size -> max-upload-size."""
    return param_name.replace("_", "-")


def setting_types(command: Any) -> dict[str, type]:
    """Each parameter's Python type, from the annotations of the command's function (X | None -> X)."""
    hints = typing.get_type_hints(inspect.unwrap(command.callback))
    types = {}
    for param in command.params:
        hint = hints[param.name]
        members = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        types[param.name] = members[0] if len(members) == 1 else hint
    return types


def read_serve_section(path: Path, command: Any) -> dict[str, Any]:
    """The file's [serve] values by parameter name, for the parameters of the click `command`.

    A missing file means no settings. Paths may start with ~ and are relative to the file's folder.
    """
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"cannot read the config file {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"the config file {path} is not valid TOML: {exc}") from exc
    for name in data:
        if name != SECTION:
            raise ConfigError(f"{path}: unknown table or key {name!r}; the serve settings go under [{SECTION}]")
    section = data.get(SECTION, {})
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: {SECTION} must be a table ([{SECTION}])")
    types = setting_types(command)
    by_key = {setting_key(name): name for name in types}
    values: dict[str, Any] = {}
    for key, value in section.items():
        name = by_key.get(key)
        if name is None:
            known = ", ".join(sorted(by_key))
            raise ConfigError(f"{path}: unknown setting {key!r} in [{SECTION}]; known settings: {known}")
        values[name] = _checked(path, key, types[name], value)
    return values


def _checked(path: Path, key: str, kind: type, value: Any) -> Any:
    """`value` if TOML gave it the setting's type (paths made absolute); ConfigError otherwise.

    Ranges are left to the command's own checks, which the file's values go through like flags.
    """
    if kind is bool:
        expected, ok = "true or false", isinstance(value, bool)
    elif kind is int:
        expected, ok = "an integer", isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        expected, ok = "a number", isinstance(value, int | float) and not isinstance(value, bool)
    elif isinstance(kind, type) and issubclass(kind, Enum):
        choices = [member.value for member in kind]
        expected, ok = f"one of {', '.join(map(repr, choices))}", value in choices
    else:
        expected, ok = "a string", isinstance(value, str)
    if not ok:
        raise ConfigError(f"{path}: [{SECTION}] {key} must be {expected}, not {value!r}")
    if kind is Path:
        return str(path.absolute().parent / Path(value).expanduser())
    return value


class ServeCommand(TyperCommand):
    """`serve`, whose defaults come from the config file: flags and environment variables still win.

    gRPCServerCLI's options that serve has no setting for are handled first (`mlx_sd.app.serve_compat`).
    """

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        value_options = {name for param in self.params if not getattr(param, "is_flag", True) for name in param.opts}
        try:
            args, notes = drop_foreign_options(args, value_options)
        except ForeignOptionError as exc:
            typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
            raise typer.Exit(2) from exc
        for note in notes:
            typer.secho(f"note: {note}", err=True, fg=typer.colors.YELLOW)
        return super().parse_args(ctx, args)

    def make_context(self, info_name: str | None, args: list[str], parent: Any = None, **extra: Any) -> Any:
        if "default_map" in extra:
            return super().make_context(info_name, args, parent, **extra)
        path = config_file_of(parent)
        try:
            from_file = read_serve_section(path, self)
        except ConfigError as exc:
            typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
            raise typer.Exit(1) from exc
        try:
            return super().make_context(info_name, args, parent, default_map=from_file, **extra)
        except typer.BadParameter as exc:
            name = getattr(exc.param, "name", None)
            if name in from_file:  # say where a value the user did not type came from
                exc.message += f" ({setting_key(name)} in {path}, unless given as a flag)"
            raise


def serve_context(ctx: typer.Context, args: Sequence[str], **extra: Any) -> Any:
    """`serve`'s parsed context for `args` (serve's flags), as `mlx-sd serve ARGS` would see them.

    Other commands use it to learn the effective settings without repeating serve's options;
    `extra` goes to the context (default_map={} ignores the config file).
    """
    root = ctx.find_root()
    serve = root.command.get_command(root, "serve")
    return serve.make_context("serve", list(args), parent=root, **extra)


@dataclass(frozen=True)
class EffectiveSetting:
    key: str  # the flag's name without the dashes
    value: Any  # as serve gets it; None where serve uses its own default folder
    source: str  # flag, environment, config file or default
    secret: bool


def effective_settings(serve_ctx: Any) -> list[EffectiveSetting]:
    """Each serve setting of a context from `serve_context`, in serve's order, with its source."""
    settings = []
    for param in serve_ctx.command.params:
        source = serve_ctx.get_parameter_source(param.name)
        label = SOURCE_LABELS.get(source.name, source.name.lower()) if source is not None else "default"
        settings.append(
            EffectiveSetting(
                setting_key(param.name), serve_ctx.params[param.name], label, param.name in SECRET_SETTINGS
            )
        )
    return settings


def shown_value(setting: EffectiveSetting) -> str:
    """The value as `config show` prints it: secrets masked, default folders resolved."""
    if setting.value is None:
        default = DIRECTORY_DEFAULTS.get(setting.key.replace("-", "_"))
        return str(default()) if default is not None else "-"
    if setting.secret:
        return MASK
    if isinstance(setting.value, bool):
        return "true" if setting.value else "false"
    return str(getattr(setting.value, "value", setting.value))  # an Enum's value


config_app = typer.Typer(help="The settings file of `mlx-sd serve`.", no_args_is_help=True)

# Serve's own flags pass through these commands unparsed, to be parsed by serve's definition.
SERVE_ARGS = {"allow_extra_args": True, "ignore_unknown_options": True}


@config_app.command("path")
def path_command(ctx: typer.Context) -> None:
    """Print where the config file is (or would be)."""
    typer.echo(config_file_of(ctx))


@config_app.command("show", context_settings=SERVE_ARGS)
def show_command(ctx: typer.Context) -> None:
    """Print serve's effective settings and where each came from (flag, environment, config file, default).

    Serve's flags may follow, e.g. `mlx-sd config show --port 7000`, to see their effect.
    """
    path = config_file_of(ctx)
    settings = effective_settings(serve_context(ctx, ctx.args))
    typer.echo(f"config file: {path}{'' if path.is_file() else ' (not found)'}")
    rows = [(s.key, shown_value(s), s.source) for s in settings]
    key_width = max(len(key) for key, _, _ in rows)
    value_width = max(len(value) for _, value, _ in rows)
    for key, value, source in rows:
        typer.echo(f"{key:<{key_width}}  {value:<{value_width}}  {source}")
