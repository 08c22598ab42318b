"""Every `mlx-sd` command docs/drawthings.md shows parses with the real command line (none is run)."""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer.main

from mlx_sd.app.cli import app

DOC = Path(__file__).parent.parent / "docs" / "drawthings.md"
SHELL_BLOCK = re.compile(r"^[ \t]*```(?:sh|bash|shell|console)\n(.*?)^[ \t]*```", re.M | re.S)
INLINE = re.compile(r"(?<!`)`(mlx-sd [^`]+)`(?!`)")


def shown_commands(text: str) -> Iterator[list[str]]:
    """The words after `mlx-sd` of each command in the doc's shell blocks and inline code."""
    for block in SHELL_BLOCK.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if "mlx-sd" in words:
                yield words[words.index("mlx-sd") + 1:]
    for code in INLINE.findall(text):
        yield shlex.split(code)[1:]


def parse(args: list[str]) -> int:
    """`mlx-sd ARGS` parsed down to its command, which is not run: 0 when it parses, 2 otherwise."""
    root = typer.main.get_command(app)
    stack = [root]
    while stack:  # no command of the tree runs: parsing is all that happens
        command = stack.pop()
        command.callback = None
        stack.extend(getattr(command, "commands", {}).values())
    try:  # without standalone mode, an exit (serve's refusals) is returned and a usage error raised
        code = root.main(args, prog_name="mlx-sd", standalone_mode=False)
    except Exception as exc:
        return getattr(exc, "exit_code", 1)
    return code if isinstance(code, int) else 0


@pytest.fixture(autouse=True)
def no_user_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """serve reads the user's config file; the doc's commands must parse without one."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("MLX_SD_SHARED_SECRET", raising=False)


COMMANDS = list(shown_commands(DOC.read_text(encoding="utf-8")))


def test_the_doc_shows_commands() -> None:
    assert sum(args[:1] == ["serve"] for args in COMMANDS) >= 5


@pytest.mark.parametrize("args", COMMANDS, ids=[shlex.join(args) for args in COMMANDS])
def test_each_command_parses(args: list[str]) -> None:
    assert parse(args) == 0


@pytest.mark.parametrize("args", [["serve", "--no-such-flag"], ["serve", "--echo-on-queue"], ["serve", "-g", "1"],
                                  ["no-such-command"]])
def test_a_wrong_command_does_not_parse(args: list[str]) -> None:
    assert parse(args) == 2
