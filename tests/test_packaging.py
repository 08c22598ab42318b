"""The Homebrew formula matches the locked dependencies, and the lock covers pyproject's runtime dependencies.

Offline: it reads the committed files only (regenerating them needs PyPI; see packaging/README.md).
"""

from __future__ import annotations

import importlib.util
import re
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

ROOT = Path(__file__).resolve().parents[1]
FORMULA = ROOT / "packaging" / "homebrew" / "mlx-sd.rb"
LOCK = ROOT / "packaging" / "requirements-lock.txt"
# The formula's target, as environment markers see it: python@3.12 on macOS arm64.
TARGET_MARKERS = {
    "sys_platform": "darwin",
    "platform_system": "Darwin",
    "platform_machine": "arm64",
    "os_name": "posix",
    "python_version": "3.12",
    "python_full_version": "3.12.0",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
}
RESOURCE = re.compile(
    r'^  resource "(?P<name>[^"]+)" do\n    url "(?P<url>[^"]+)"(?P<using>, using: :nounzip)?\n'
    r'    sha256 "(?P<sha>[0-9a-f]{64})"\n  end$',
    re.M,
)


def load_script():
    spec = importlib.util.spec_from_file_location("update_resources", ROOT / "packaging/homebrew/update_resources.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return load_script()


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


def test_each_file_is_the_pinned_version_for_the_target(script, locked) -> None:
    target = set(script.target_tags())
    for name, locked_file in locked.items():
        file_name, file_version = script.file_version(locked_file.filename)
        assert (file_name, str(file_version)) == (name, locked_file.version)
        if locked_file.is_wheel:
            assert target & set(parse_wheel_filename(locked_file.filename)[3]), (
                f"{locked_file.filename} will not install"
            )


def test_wheels_stay_zipped(formula) -> None:
    for resource in RESOURCE.finditer(formula):
        assert bool(resource["using"]) == resource["url"].endswith(".whl"), resource["name"]


def test_every_runtime_dependency_is_locked_in_a_matching_version(locked) -> None:
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    needed = [r for r in map(Requirement, dependencies) if r.marker is None or r.marker.evaluate(TARGET_MARKERS)]
    assert {"mlx", "zeroconf", "grpcio"} <= {canonicalize_name(r.name) for r in needed}
    for requirement in needed:
        name = canonicalize_name(requirement.name)
        assert name in locked, f"{name} is not in {LOCK.name}"
        assert requirement.specifier.contains(locked[name].version, prereleases=True), f"{name} {locked[name].version}"


def test_formula_follows_homebrew_python_conventions(formula) -> None:
    assert "include Language::Python::Virtualenv" in formula
    assert 'depends_on "python@3.12"' in formula
    assert "virtualenv_install_with_resources" in formula


def test_service_block_runs_serve_in_the_background(formula) -> None:
    service = formula[formula.index("  service do") : formula.index("  test do")]
    assert 'run [opt_bin/"mlx-sd", "serve"]' in service
    assert "keep_alive true" in service
    assert 'log_path var/"log/mlx-sd.log"' in service and "error_log_path" in service


def test_test_block_checks_the_version_and_an_echo_round_trip(formula) -> None:
    test = formula[formula.index("  test do") :]
    assert "mlx-sd --version" in test
    assert '"serve"' in test and "--port" in test and "mlx-sd echo --server 127.0.0.1:#{port}" in test
    assert 'assert_equal "HELLO"' in test


def test_choose_file_prefers_macos_wheels_for_compiled_code_and_sdists_otherwise(script) -> None:
    def entry(filename: str) -> dict:
        return {"filename": filename, "url": f"https://files.example/{filename}", "hashes": {"sha256": "0" * 64}}

    compiled = [
        entry("numpy-2.0.0.tar.gz"),
        entry("numpy-2.0.0-cp312-cp312-macosx_14_0_arm64.whl"),
        entry("numpy-2.0.0-cp312-cp312-macosx_15_0_arm64.whl"),  # needs a newer macOS than the target
        entry("numpy-2.0.0-cp312-cp312-manylinux_2_17_x86_64.whl"),
    ]
    assert script.choose_file("numpy", "2.0.0", compiled).filename == "numpy-2.0.0-cp312-cp312-macosx_14_0_arm64.whl"
    pure = [entry("click-8.0.0-py3-none-any.whl"), entry("click-8.0.0.tar.gz"), entry("click-7.0.0.tar.gz")]
    assert script.choose_file("click", "8.0.0", pure).filename == "click-8.0.0.tar.gz"
    assert script.choose_file("click", "8.0.0", pure[:1]).filename == "click-8.0.0-py3-none-any.whl"
    with pytest.raises(SystemExit, match="no sdist and no wheel"):
        script.choose_file("numpy", "2.0.0", compiled[2:])
