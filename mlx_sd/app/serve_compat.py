"""The options of Draw Things' gRPCServerCLI that `mlx-sd serve` has no setting for.

serve takes that server's own spellings (the models directory as its argument, -p/--port,
-a/--address, -n/--name, -s/--shared-secret, --no-tls, --no-response-compression,
--model-browser), so a script written for it keeps working. Of its other options, those that only
tune speed, memory or logging are accepted and ignored with a note; those whose effect this server
cannot give are refused, naming the option and why, before anything starts.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

ALWAYS, NEVER = True, False


class ForeignOptionError(Exception):
    """A gRPCServerCLI option that serve refuses (or misspelt); the message names it and says why."""


@dataclass(frozen=True)
class ForeignOption:
    names: tuple[str, ...]
    takes_value: bool
    # True: accepted with a note, False: refused; a set: accepted with these values only.
    ignored: bool | frozenset[str]
    why: str

    def is_ignored(self, value: str | None) -> bool:
        return self.ignored if isinstance(self.ignored, bool) else value in self.ignored


FOREIGN_OPTIONS = (
    ForeignOption(("-g", "--gpu"), True, frozenset({"0"}),
                  "MLX runs on the Mac's one GPU (0); no other can be chosen"),
    ForeignOption(("-w", "--weights-cache"), True, ALWAYS,
                  "one model is kept in memory; converted weights are cached on disk (--cache-dir)"),
    ForeignOption(("--no-flash-attention",), False, ALWAYS, "attention uses MLX's own kernels"),
    ForeignOption(("--fread-preferred",), False, ALWAYS, "it only changes how fast weights are read"),
    ForeignOption(("--cpu-offload",), False, ALWAYS,
                  "weights stay in unified memory; --low-memory frees the text encoder between prompts"),
    ForeignOption(("--debug",), False, ALWAYS, "use --log-level debug for verbose logs"),
    ForeignOption(("--cancellation-warning-timeout",), True, ALWAYS,
                  "cancellation is checked between sampling steps"),
    ForeignOption(("--cancellation-crash-timeout",), True, ALWAYS,
                  "cancellation is checked between sampling steps"),
    ForeignOption(("--echo-on-queue",), False, NEVER,
                  "Echo is answered at once, not on the generation queue, so it is no health check of the queue"),
    ForeignOption(("-d", "--datadog-api-key"), True, NEVER, "logs go to standard error, not to Datadog"),
    ForeignOption(("--join",), True, NEVER, "joining a proxy of several servers is not supported"),
    *(
        ForeignOption((name,), True, NEVER, "models are read from the models directory only, not from a blob store")
        for name in ("--secondary-models-directory", "--blob-store-access-key", "--blob-store-secret",
                     "--blob-store-endpoint", "--blob-store-bucket")
    ),
    ForeignOption(("--cache-uri",), True, NEVER, "converted weights are cached in --cache-dir"),
    *(
        ForeignOption((name,), takes_value, NEVER,
                      "the server does not supervise itself; run it as a service (`mlx-sd service install`)")
        for name, takes_value in (("--supervised", False), ("--max-crashes-within-time-window", True),
                                  ("--crash-time-window", True))
    ),
)
_BY_NAME = {name: option for option in FOREIGN_OPTIONS for name in option.names}


def _match(arg: str) -> tuple[ForeignOption, str, str | None] | None:
    """The option `arg` spells, its name, and a value attached to it (`--gpu=0`, `-g0`)."""
    if arg.startswith("--"):
        name, equals, value = arg.partition("=")
        option = _BY_NAME.get(name)
        return (option, name, value if equals else None) if option else None
    if arg.startswith("-") and len(arg) >= 2 and (option := _BY_NAME.get(arg[:2])) is not None:
        return option, arg[:2], arg[2:] or None
    return None


def drop_foreign_options(args: Sequence[str], value_options: Collection[str] = ()) -> tuple[list[str], list[str]]:
    """`args` without the ignored gRPCServerCLI options, and a note on each one dropped.
    `value_options` are serve's own options that take a value, whose value is passed on unread.

    Raises ForeignOptionError for a refused option (or an ignored one missing its value).
    """
    kept: list[str] = []
    notes: list[str] = []
    rest = list(args)
    while rest:
        arg = rest.pop(0)
        if arg == "--":  # what follows is positional
            kept += [arg, *rest]
            break
        if arg in value_options:
            kept += [arg, *rest[:1]]
            del rest[:1]
            continue
        matched = _match(arg)
        if matched is None:
            kept.append(arg)
            continue
        option, name, value = matched
        if option.takes_value and value is None:
            if not rest:
                raise ForeignOptionError(f"{name} (a gRPCServerCLI option) needs a value")
            value = rest.pop(0)
        elif not option.takes_value and value is not None:
            raise ForeignOptionError(f"{name} takes no value")
        shown = f"{name} {value}" if option.takes_value else name
        if not option.is_ignored(value):
            raise ForeignOptionError(f"{shown} (a gRPCServerCLI option) is not supported: {option.why}")
        notes.append(f"{shown} (a gRPCServerCLI option) is ignored: {option.why}")
    return kept, notes
