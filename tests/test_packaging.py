"""The Homebrew formula matches the locked dependencies, the lock covers pyproject's runtime dependencies,
and the release script writes a formula without placeholders.

Offline: it reads the committed files only (regenerating them needs PyPI; see packaging/README.md).
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
FORMULA = ROOT / "packaging" / "homebrew" / "mlx-sd.rb"
LOCK = ROOT / "packaging" / "requirements-lock.txt"
# The formula's target, as environment markers see it: python@3.14 on macOS arm64.
TARGET_MARKERS = {
    "sys_platform": "darwin",
    "platform_system": "Darwin",
    "platform_machine": "arm64",
    "os_name": "posix",
    "python_version": "3.14",
    "python_full_version": "3.14.0",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
}
RESOURCE = re.compile(
    r'^  resource "(?P<name>[^"]+)" do\n    url "(?P<url>[^"]+)"(?P<using>, using: :nounzip)?\n'
    r'    sha256 "(?P<sha>[0-9a-f]{64})"\n  end$',
    re.M,
)


def load_script(path: str = "packaging/homebrew/update_resources.py"):
    spec = importlib.util.spec_from_file_location(Path(path).stem, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return load_script()


@pytest.fixture(scope="module")
def release():
    return load_script("packaging/release.py")


@pytest.fixture(scope="module")
def locked(script):
    return {f.name: f for f in script.parse_lock(LOCK.read_text())}


@pytest.fixture(scope="module")
def formula() -> str:
    return FORMULA.read_text()


def test_the_lock_is_complete_and_parsable(script, locked) -> None:
    pins = re.findall(r"^\S+==\S+", LOCK.read_text(), re.M)
    assert len(pins) == len(locked) > 0


def test_formula_resources_are_the_locked_files(locked, formula) -> None:
    resources = {m["name"]: m for m in RESOURCE.finditer(formula)}
    assert sorted(resources) == sorted(locked)
    for name, resource in resources.items():
        assert (resource["url"], resource["sha"]) == (locked[name].url, locked[name].sha256), name


def test_formula_resources_are_regenerated_exactly(script, locked, formula) -> None:
    assert script.update_formula(formula, locked.values()) == formula, (
        "run packaging/homebrew/update_resources.py formula"
    )


def test_each_file_is_the_pinned_version_s_sdist(script, locked) -> None:
    for name, locked_file in locked.items():
        file_name, file_version = script.file_version(locked_file.filename)
        assert (file_name, str(file_version)) == (name, locked_file.version)
        assert not locked_file.is_wheel or locked_file.filename.endswith("-none-any.whl"), locked_file.filename


def test_formula_packages_are_formula_dependencies_not_resources(script, locked, formula) -> None:
    """mlx, numpy, cryptography and pillow come from Homebrew's formulae, as in homebrew-core's mlx-lm."""
    assert not script.formula_provided() & set(locked)
    for dependency in script.FORMULA_PACKAGES:
        assert re.search(rf'^  depends_on "{dependency}"', formula, re.M), dependency
    assert "macosx_14" not in formula and ".whl" not in formula  # nothing pinned to one macOS


def test_every_runtime_dependency_is_locked_in_a_matching_version(locked) -> None:
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    needed = [r for r in map(Requirement, dependencies) if r.marker is None or r.marker.evaluate(TARGET_MARKERS)]
    assert {"mlx", "zeroconf", "grpcio"} <= {canonicalize_name(r.name) for r in needed}
    provided = load_script().formula_provided()
    for requirement in needed:
        name = canonicalize_name(requirement.name)
        if name in provided:
            continue
        assert name in locked, f"{name} is not in {LOCK.name}"
        assert requirement.specifier.contains(locked[name].version, prereleases=True), f"{name} {locked[name].version}"


def test_formula_follows_homebrew_python_conventions(formula) -> None:
    assert "include Language::Python::Virtualenv" in formula
    assert 'depends_on "python@3.14"' in formula  # the mlx formula's Python
    assert "virtualenv_install_with_resources" in formula
    assert "pypi_packages exclude_packages: %w[cryptography mlx numpy pillow]" in formula


def test_service_block_runs_serve_interactive_and_throttled(formula) -> None:
    service = formula[formula.index("  service do") : formula.index("  test do")]
    assert 'run [opt_bin/"mlx-sd", "serve"]' in service
    assert "keep_alive successful_exit: false" in service and "throttle_interval 60" in service
    assert "process_type :interactive" in service and "MLX_SD_SERVICE_LOG" in service
    assert 'log_path var/"log/mlx-sd.log"' in service and "error_log_path" in service


def test_test_block_checks_the_version_and_an_echo_round_trip(formula) -> None:
    test = formula[formula.index("  test do") :]
    assert "mlx-sd --version" in test and "version.head?" in test  # --HEAD's version is HEAD-<commit>
    assert '"serve"' in test and "--port" in test and "mlx-sd echo --server 127.0.0.1:#{port}" in test
    assert 'assert_equal "HELLO"' in test


def test_choose_file_takes_the_sdist(script) -> None:
    def entry(filename: str) -> dict:
        return {"filename": filename, "url": f"https://files.example/{filename}", "hashes": {"sha256": "0" * 64}}

    compiled = [
        entry("grpcio-1.0.0-cp314-cp314-macosx_14_0_arm64.whl"),
        entry("grpcio-1.0.0.tar.gz"),
        entry("grpcio-0.9.0.tar.gz"),
    ]
    assert script.choose_file("grpcio", "1.0.0", compiled).filename == "grpcio-1.0.0.tar.gz"
    pure = [entry("click-8.0.0-py3-none-any.whl")]
    assert script.choose_file("click", "8.0.0", pure).filename == "click-8.0.0-py3-none-any.whl"
    with pytest.raises(SystemExit, match="no sdist and no pure wheel"):
        script.choose_file("grpcio", "1.0.0", compiled[:1])


# The release block.

PLACEHOLDERS = re.compile(r"OWNER|0{64}|placeholder|example\.(com|org)|TODO", re.I)


def test_the_release_script_writes_a_formula_without_placeholders(release, formula, tmp_path: Path) -> None:
    project = release.Project.read()
    sdist = tmp_path / project.sdist_name
    sdist.write_bytes(b"an sdist")
    written = release.write_release(formula, project, release.sha256_of(sdist))
    assert not PLACEHOLDERS.search(written)
    homepage = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]["Homepage"]
    assert f'  homepage "{homepage}"\n' in written
    assert f'  url "{homepage}/releases/download/v{project.version}/mlx_sd-{project.version}.tar.gz"\n' in written
    assert f'  sha256 "{hashlib.sha256(b"an sdist").hexdigest()}"\n' in written
    assert f'  head "{homepage}.git", branch: "main"\n' in written


def test_the_committed_formula_is_the_release_block_of_pyproject(release, formula) -> None:
    """Committed between releases: no url (--HEAD only), everything else from pyproject.toml."""
    assert release.write_release(formula, release.Project.read(), None) == formula, "run packaging/release.py"
    assert not PLACEHOLDERS.search(formula)
    assert 'MLX_MINIMUM = "0.31.2".freeze' in formula  # pyproject's floor for mlx on macOS
    assert 'Formula["mlx"].version < Version.new(MLX_MINIMUM)' in formula


def test_the_release_script_builds_the_sdist(release, tmp_path: Path) -> None:
    sdist = release.build_sdist(tmp_path)
    assert sdist.name == release.Project.read().sdist_name
    with tarfile.open(sdist) as archive:
        names = set(archive.getnames())
    root = sdist.name.removesuffix(".tar.gz")
    assert {f"{root}/setup.py", f"{root}/pyproject.toml", f"{root}/mlx_sd/cpu/kernels.h"} <= names
