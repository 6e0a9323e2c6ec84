"""environment.yml and the Makefile must agree with pyproject.toml, the single source of dependencies."""

import re
import sys
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


@pytest.fixture(scope="module")
def env():
    return yaml.safe_load((ROOT / "environment.yml").read_text())


def conda_dep(env, name):
    """The version in a conda dependency like `python=3.11`."""
    for dep in env["dependencies"]:
        if isinstance(dep, str) and re.split(r"[=<>! ]", dep, maxsplit=1)[0] == name:
            version = dep[len(name):].lstrip("=").strip().removesuffix(".*")
            assert version, f"environment.yml: {dep!r} has no version"
            return version
    pytest.fail(f"environment.yml has no {name} dependency")


def pip_lines(env):
    sections = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(sections) == 1, "environment.yml needs exactly one pip section"
    return [str(line).strip() for line in sections[0]]


def env_torch_pin(env):
    pins = [Requirement(line) for line in pip_lines(env) if re.match(r"torch\b", line)]
    assert len(pins) == 1, "environment.yml's pip section needs exactly one torch line"
    (spec,) = pins[0].specifier
    assert spec.operator == "==", f"environment.yml must pin torch with ==, not {spec}"
    return Version(spec.version)


def test_conda_python_satisfies_requires_python(env, pyproject):
    python = conda_dep(env, "python")
    requires = SpecifierSet(pyproject["requires-python"])
    assert Version(python) in requires, f"python={python} does not satisfy requires-python {requires}"


def test_pip_extras_exist_in_pyproject(env, pyproject):
    editable = [line for line in pip_lines(env) if line.startswith("-e")]
    assert len(editable) == 1, "environment.yml's pip section needs exactly one `-e .[...]` line"
    match = re.fullmatch(r"-e\s+\.(?:\[([^\]]*)\])?", editable[0])
    assert match, f"cannot parse {editable[0]!r}"
    extras = {e.strip() for e in (match.group(1) or "").split(",") if e.strip()}
    missing = extras - set(pyproject.get("optional-dependencies", {}))
    assert not missing, f"environment.yml asks for extras that pyproject.toml lacks: {sorted(missing)}"


def test_pip_names_no_other_index(env):
    offending = [line for line in pip_lines(env) if "index-url" in line or "://" in line]
    assert not offending, f"environment.yml must not name package hosts: {offending}"


def test_env_torch_pin_satisfies_pyproject(env, pyproject):
    torch_reqs = [r for r in map(Requirement, pyproject["dependencies"]) if r.name == "torch"]
    assert len(torch_reqs) == 1, "pyproject.toml needs exactly one torch dependency"
    pin = env_torch_pin(env)
    assert pin in torch_reqs[0].specifier, f"torch=={pin} does not satisfy pyproject's {torch_reqs[0]}"


def test_makefile_torch_pin_matches_env(env):
    match = re.search(r"^TORCH_PIN\s*\??=\s*(\S+)\s*$", (ROOT / "Makefile").read_text(), re.M)
    assert match, "Makefile has no TORCH_PIN"
    assert Version(match.group(1)) == env_torch_pin(env), (
        f"Makefile TORCH_PIN={match.group(1)} but environment.yml pins torch=={env_torch_pin(env)}"
    )
