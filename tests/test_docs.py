"""The docs check: README.md, docs/*.md and benchmarks/README.md stay true to the code.

- README.md stays short (the details live in docs/).
- Every relative link points at a file that exists, and at a heading that exists in it.
- Every `mlx-sd ...` command the docs show, in shell code blocks and in inline code, parses
  against the real CLI: unknown options, wrong argument counts and bad values fail, naming the
  doc and line. Commands whose flags are serve's (`doctor`, `config show`, `service install`)
  have those flags parsed by serve's definition, as they are at run time. Nothing is run.
- The safe and quick ones (`--help`, `--version`, `config`, `doctor`) are run for real, and so
  is `--help` of every command.
- Every command of the CLI is shown somewhere, and the README's Quick start test command is
  the one CI runs (`.ci/run`).
- Scripts that shell blocks run (`benchmarks/run_sd15.py`, ...) exist.
- No page holds a merge's conflict markers.

New pages under docs/ are covered as they are added.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.core import TyperGroup
from typer.testing import CliRunner, Result

from grpc_service.auth import SHARED_SECRET_ENV
from mlx_sd.app import os_service as service
from mlx_sd.app.cli import app
from mlx_sd.app.config import serve_context

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted([README, *(ROOT / "docs").glob("*.md"), ROOT / "benchmarks" / "README.md"])
COMMAND_DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]  # pages that show mlx-sd commands
MAX_README_LINES = 200
SHELL_LANGUAGES = {"sh", "shell", "bash", "console"}
SHELL_OPERATORS = {"&&", "||", ";", "|", "&"}
# Commands run for real by test_safe_commands_run, with the exit statuses they may end with.
SAFE_COMMANDS = {("config", "path"): {0}, ("config", "show"): {0}, ("doctor",): {0, 1}}

FENCE = re.compile(r"^(`{3,}|~{3,})\s*([\w+-]*)")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^()\s]+)\)")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


@dataclass(frozen=True)
class DocLine:
    path: Path
    number: int
    text: str
    fence: str | None  # the language of the fenced block the line is in ("" if none given); None: prose

    @property
    def where(self) -> str:
        return f"{rel(self.path)}:{self.number}"


def doc_lines(path: Path) -> Iterator[DocLine]:
    """The lines of a Markdown file, each marked with the fenced block it is in, if any."""
    fence: tuple[str, str] | None = None  # (marker, language)
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        opening = FENCE.match(text.strip())
        if fence is None and opening:
            fence = (opening.group(1), opening.group(2).lower())
            continue
        if fence is not None and text.strip().startswith(fence[0]) and not text.strip().strip(fence[0][0]):
            fence = None
            continue
        yield DocLine(path, number, text, fence[1] if fence else None)


def prose(line: str) -> str:
    """A line of prose without its inline code, so that links and code are told apart."""
    return INLINE_CODE.sub("", line)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|__|\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for line in doc_lines(path):
        match = HEADING.match(line.text) if line.fence is None else None
        if match:
            base = slug(match.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


# --- the commands the docs show -------------------------------------------------------------


@dataclass(frozen=True)
class DocCommand:
    line: DocLine
    args: tuple[str, ...]  # after `mlx-sd`
    inline: bool  # inline code in prose, where naming a command without its arguments is fine

    @property
    def id(self) -> str:
        return f"{self.line.where}:{shlex.join(['mlx-sd', *self.args])}"


def shell_commands(text: str) -> Iterator[list[str]]:
    """The simple commands of a shell line, split at &&, ||, ;, | and &; comments dropped."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    command: list[str] = []
    for token in lexer:
        if token in SHELL_OPERATORS:
            yield command
            command = []
        else:
            command.append(token)
    yield command


def shell_lines(path: Path) -> Iterator[tuple[DocLine, str]]:
    """Each command line of the file's shell blocks (continuation lines joined), console prompts cut."""
    pending = ""
    for line in doc_lines(path):
        if line.fence not in SHELL_LANGUAGES:
            continue
        text = line.text.strip()
        if line.fence == "console":
            if not text.startswith("$ ") and not pending:
                continue  # the command's output
            text = text.removeprefix("$ ")
        if text.endswith("\\"):
            pending += text[:-1] + " "
            continue
        yield line, pending + text
        pending = ""


def doc_commands() -> list[DocCommand]:
    commands = []
    for path in COMMAND_DOCS:
        for line, text in shell_lines(path):
            for words in shell_commands(text):
                if words and Path(words[0]).name == "mlx-sd":
                    commands.append(DocCommand(line, tuple(words[1:]), inline=False))
        for line in doc_lines(path):
            if line.fence is None:
                for _, code in INLINE_CODE.findall(line.text):
                    words = shlex.split(code) if code.startswith("mlx-sd ") or code == "mlx-sd" else []
                    if words:
                        commands.append(DocCommand(line, tuple(words[1:]), inline=True))
    return commands


DOC_COMMANDS = doc_commands()


def cli() -> TyperGroup:
    """A fresh command tree of the real app (typer builds new objects on every call)."""
    command = typer.main.get_command(app)
    assert isinstance(command, TyperGroup)
    return command


def walk(command: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """(words, command) for the root and every (sub)command under it."""
    yield path, command
    if isinstance(command, TyperGroup):
        for name, sub in command.commands.items():
            yield from walk(sub, (*path, name))


def command_path(args: tuple[str, ...]) -> tuple[str, ...]:
    """The words of `args` that name a (sub)command, after the root's own options."""
    command: Any = cli()
    takes_value = {opt for param in command.params if not param.is_flag for opt in param.opts}
    words = iter(args)
    path: list[str] = []
    for word in words:
        if not path and word.startswith("-"):
            if word in takes_value:
                next(words, None)
            continue
        if not isinstance(command, TyperGroup) or word not in command.commands:
            break
        command = command.commands[word]
        path.append(word)
    return tuple(path)


def parsing_only(root: TyperGroup) -> list[typer.Context]:
    """Makes `root`'s commands parse their arguments and record their context instead of running.
    Returns the record."""
    reached: list[typer.Context] = []

    def record(ctx: typer.Context) -> None:
        reached.append(ctx)
        if ctx.args and ctx.ignore_unknown_options:  # serve's flags, passed through
            serve_context(ctx, ctx.args, default_map={})

    for _, command in walk(root):
        if not isinstance(command, TyperGroup):
            command.invoke = record
    return reached


def as_on_the_readers_machine(args: tuple[str, ...]) -> tuple[str, ...]:
    """`args` as the shell passes them in the current folder, where the files they name exist:
    `~` expanded, an empty file made for each word with a file name's suffix (`photo.png`) and
    a folder for each word ending in `/`."""
    expanded = tuple(str(Path.home()) + word[1:] if word.startswith("~/") else word for word in args)
    for word in expanded:
        if word.startswith("-"):
            continue
        if word.endswith("/"):
            Path(word).mkdir(parents=True, exist_ok=True)
        elif re.search(r"\.[A-Za-z]\w*$", word) and not Path(word).exists():
            Path(word).parent.mkdir(parents=True, exist_ok=True)
            Path(word).touch()
    return expanded


@dataclass(frozen=True)
class Parsed:
    exit_code: int  # 0: parsed (or --help/--version answered); 2: a usage error, as the CLI exits with
    message: str  # what the CLI printed
    context: typer.Context | None  # the command reached, if it was


def parse(args: tuple[str, ...]) -> Parsed:
    """`mlx-sd ARGS` parsed as the CLI parses it, down to the command, which is not run."""
    root = cli()
    reached = parsing_only(root)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            root.main(list(as_on_the_readers_machine(args)), prog_name="mlx-sd")
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return Parsed(code, out.getvalue(), reached[-1] if reached else None)


@pytest.fixture(autouse=True)
def clean_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Everything a command may read or write by default lives in tmp_path; no user settings count."""
    for name, sub in (("HOME", "home"), ("XDG_CONFIG_HOME", "config"), ("XDG_DATA_HOME", "data"),
                      ("XDG_CACHE_HOME", "cache")):
        monkeypatch.setenv(name, str(tmp_path / sub))
    monkeypatch.delenv(SHARED_SECRET_ENV, raising=False)
    monkeypatch.chdir(tmp_path)


# --- the tests ------------------------------------------------------------------------------


def test_readme_is_short() -> None:
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; move details into docs/"


def test_the_docs_are_found() -> None:
    assert len(COMMAND_DOCS) >= 5 and all(path.is_file() for path in DOCS)
    assert len(DOC_COMMANDS) >= 30


@pytest.mark.parametrize("path", DOCS, ids=rel)
def test_relative_links_resolve(path: Path) -> None:
    broken = []
    for line in doc_lines(path):
        if line.fence is not None:
            continue
        for target in LINK.findall(prose(line.text)):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            resolved = (path.parent / file).resolve() if file else path
            if not resolved.exists():
                broken.append(f"{line.where}: {target} (no such file)")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                broken.append(f"{line.where}: {target} (no heading #{anchor} in {rel(resolved)})")
    assert not broken, "\n".join(broken)


@pytest.mark.parametrize("path", DOCS, ids=rel)
def test_scripts_the_docs_run_exist(path: Path) -> None:
    missing = [
        f"{line.where}: {word}"
        for line, text in shell_lines(path)
        for words in shell_commands(text)
        for word in words
        if re.fullmatch(r"(benchmarks|tests|packaging|convert|mlx_sd|grpc_service)/[\w./-]+\.(py|sh)", word)
        and not (ROOT / word).is_file()
    ]
    assert not missing, "\n".join(missing)


@pytest.mark.parametrize("command", DOC_COMMANDS, ids=lambda command: command.id)
def test_doc_commands_parse(command: DocCommand) -> None:
    if command.inline and command_path(command.args) == command.args:
        return  # a command named in prose, like `mlx-sd upload`: the name exists
    parsed = parse(command.args)
    if parsed.exit_code != 0:
        pytest.fail(f"{command.line.where}: `{shlex.join(['mlx-sd', *command.args])}`:\n{parsed.message}")


def test_a_wrong_command_fails_to_parse() -> None:
    """The parse check can fail: what a typo in the docs would look like."""
    for args in (("serve", "--prot", "7860"), ("convert", "a.safetensors"), ("generate", "x", "--steps", "many"),
                 ("doctor", "--no-such-flag"), ("servce",), ("upload", "a", "b", "c")):
        parsed = parse(args)
        assert parsed.exit_code == 2 and "Error" in parsed.message, (args, parsed)
    parsed = parse(("upload", "a.safetensors", "--server", "studio:7859"))
    assert parsed.exit_code == 0 and parsed.context is not None
    assert parsed.context.params["local"].name == "a.safetensors" and parsed.context.params["server"] == "studio:7859"


def run(args: list[str] | tuple[str, ...]) -> Result:
    return CliRunner().invoke(app, list(args))


@pytest.mark.parametrize("path", [path for path, _ in walk(cli())], ids=lambda path: " ".join(["mlx-sd", *path]))
def test_every_command_has_help(path: tuple[str, ...]) -> None:
    result = run([*path, "--help"])
    assert result.exit_code == 0, result.output
    assert " ".join(["Usage:", "mlx-sd", *path]) in " ".join(result.output.split())


def safe(command: DocCommand) -> bool:
    return "--help" in command.args or "--version" in command.args or command_path(command.args) in SAFE_COMMANDS


def safe_doc_commands() -> list[DocCommand]:
    """The safe commands the docs show, each once (where it first appears)."""
    first: dict[tuple[str, ...], DocCommand] = {}
    for command in DOC_COMMANDS:
        if safe(command):
            first.setdefault(command.args, command)
    return list(first.values())


@pytest.mark.parametrize("command", safe_doc_commands(), ids=lambda command: command.id)
def test_safe_commands_run(command: DocCommand, monkeypatch: pytest.MonkeyPatch) -> None:
    # doctor asks the service manager about the service: answer as systemd does for a unit not running
    monkeypatch.setattr(service, "current_platform", lambda: "linux")
    monkeypatch.setattr(service, "run_command",
                        lambda args, capture=True: service.CommandResult(0, "ActiveState=inactive\nMainPID=0\n"))
    result = run(command.args)
    allowed = SAFE_COMMANDS.get(command_path(command.args), {0})
    assert result.exit_code in allowed and (result.exception is None or isinstance(result.exception, SystemExit)), (
        f"{command.line.where}: exit status {result.exit_code}\n{result.output}"
    )
    assert result.output.strip()
    if command_path(command.args) == ("doctor",):
        checks = [line for line in result.output.splitlines() if not line.startswith(" ")]
        assert checks and all(line.split()[0] in ("OK", "WARN", "FAIL") for line in checks), result.output


def test_every_command_is_documented() -> None:
    shown = {command_path(command.args) for command in DOC_COMMANDS}
    leaves = [path for path, command in walk(cli()) if path and not isinstance(command, TyperGroup)]
    missing = [" ".join(["mlx-sd", *path]) for path in leaves if path not in shown]
    assert not missing, f"not shown in README.md or docs/: {', '.join(missing)}"


def quick_start_commands() -> list[str]:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block, "README.md's Quick start has no sh block"
    return [line for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]


def test_quick_start_is_what_ci_runs() -> None:
    serve, tests = quick_start_commands()
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.startswith("#") and not line.startswith(("set ", "cd ", " "))]
    # The README's command first, verbatim; then only the second pass on MLX's own ops.
    assert ci[0] == tests
    assert all(line.startswith("MLX_SD_BACKEND=mlx .venv/bin/python -m pytest -q ") for line in ci[1:])
    assert serve.endswith(".venv/bin/mlx-sd serve") and tests.endswith("pytest -q")


CONFLICT_MARKER = re.compile(r"^(<{7}|={7}|>{7})( |$)")


@pytest.mark.parametrize("path", DOCS, ids=rel)
def test_no_page_holds_conflict_markers(path: Path) -> None:
    marked = [line.number for line in doc_lines(path) if CONFLICT_MARKER.match(line.text)]
    assert not marked, f"{rel(path)}: merge conflict markers on lines {marked}"
