#!/usr/bin/env python3
"""Writes the Homebrew formula's release block from pyproject.toml and the sdist of this version.

    python packaging/release.py             # build dist/mlx_sd-<version>.tar.gz, point the formula at it
    python packaging/release.py --head-only # no sdist: the formula installs with --HEAD only

The block between the BEGIN release and END release markers of packaging/homebrew/mlx-sd.rb holds
the homepage, url, sha256, license and head, and MLX_MINIMUM, mlx's floor in pyproject.toml (the
formula uses Homebrew's mlx, which has no version pin, so `install` checks it). The homepage is
pyproject's [project.urls] Homepage, a GitHub repository; the url is the sdist as an asset of
the release tagged v<version>, so upload dist/mlx_sd-<version>.tar.gz there, unchanged, with the tag.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
FORMULA = ROOT / "packaging" / "homebrew" / "mlx-sd.rb"
DIST = ROOT / "dist"
BEGIN = "  # BEGIN release: written by packaging/release.py from pyproject.toml and the sdist"
END = "  # END release"
# The formula's target, as environment markers see it (mlx's floor is the macOS requirement's).
MAC_MARKERS = {"sys_platform": "darwin", "platform_system": "Darwin", "platform_machine": "arm64"}


@dataclass(frozen=True)
class Project:
    name: str
    version: str
    homepage: str  # https://github.com/<owner>/<repo>
    license: str
    mlx_minimum: str

    @classmethod
    def read(cls, pyproject: Path = PYPROJECT) -> Project:
        project = tomllib.loads(pyproject.read_text())["project"]
        homepage = project["urls"]["Homepage"].rstrip("/")
        if not re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", homepage):
            raise SystemExit(f"[project.urls] Homepage must be a GitHub repository, not {homepage}")
        return cls(project["name"], project["version"], homepage, project["license"], mlx_floor(project))

    @property
    def sdist_name(self) -> str:
        return f"{self.name.replace('-', '_')}-{self.version}.tar.gz"

    @property
    def sdist_url(self) -> str:
        return f"{self.homepage}/releases/download/v{self.version}/{self.sdist_name}"


def mlx_floor(project: dict) -> str:
    """The lowest mlx version the macOS dependency accepts (`mlx>=X` on darwin)."""
    for text in project["dependencies"]:
        requirement = Requirement(text)
        if requirement.name == "mlx" and (requirement.marker is None or requirement.marker.evaluate(MAC_MARKERS)):
            floors = [spec.version for spec in requirement.specifier if spec.operator == ">="]
            if floors:
                return floors[0]
    raise SystemExit("pyproject.toml has no mlx>=X dependency for macOS")


def build_sdist(out_dir: Path = DIST) -> Path:
    """Builds the sdist with setuptools' PEP 517 backend, in a fresh process in the project root."""
    out_dir.mkdir(exist_ok=True)
    code = f"from setuptools import build_meta; print(build_meta.build_sdist({str(out_dir)!r}))"
    output = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True)
    return out_dir / output.stdout.strip().splitlines()[-1]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def release_block(project: Project, sdist_sha256: str | None) -> str:
    lines = [f'  homepage "{project.homepage}"']
    if sdist_sha256 is not None:
        lines += [f'  url "{project.sdist_url}"', f'  sha256 "{sdist_sha256}"']
    lines += [
        f'  license "{project.license}"',
        f'  head "{project.homepage}.git", branch: "main"',
        "",
        "  # pyproject.toml's floor for mlx: Homebrew's mlx formula has no version pin, so install checks it.",
        f'  MLX_MINIMUM = "{project.mlx_minimum}".freeze',
    ]
    return "\n".join(lines) + "\n"


def write_release(formula: str, project: Project, sdist_sha256: str | None) -> str:
    """`formula` with the text between the BEGIN and END release markers replaced."""
    start, end = formula.index(BEGIN) + len(BEGIN) + 1, formula.index(END)
    return formula[:start] + release_block(project, sdist_sha256) + formula[end:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--head-only", action="store_true", help="write no url and sha256 (no sdist is built)")
    head_only = parser.parse_args().head_only
    project = Project.read()
    sha = None
    if not head_only:
        sdist = build_sdist()
        if sdist.name != project.sdist_name:
            raise SystemExit(f"built {sdist.name}, expected {project.sdist_name}")
        sha = sha256_of(sdist)
        print(f"built {sdist.relative_to(ROOT)} (sha256 {sha}); upload it to the v{project.version} release")
    FORMULA.write_text(write_release(FORMULA.read_text(), project, sha))
    print(f"wrote {FORMULA.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
