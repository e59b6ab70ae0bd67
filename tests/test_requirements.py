"""The pinned sets: requirements.txt is torch plus requirements-gpu.txt, which keeps a GPU user's own torch and
pins every third-party package that dali imports."""

import ast
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _pins(name: str) -> dict[str, str]:
    pins = {}
    for line in (ROOT / name).read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+)==(\S+)$", line.strip())
        if match:
            pins[match.group(1).lower().replace("_", "-")] = match.group(2)
    return pins


def _third_party_imports() -> set[str]:
    names = set()
    for path in (ROOT / "dali").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
    return {name for name in names if name not in sys.stdlib_module_names and name != "dali"}


def test_the_cpu_set_is_torch_plus_the_gpu_set():
    lines = [line for line in (ROOT / "requirements.txt").read_text().splitlines() if not line.startswith("#")]
    assert lines == [f"torch=={_pins('requirements.txt')['torch']}", "-r requirements-gpu.txt"]
    assert "torch" not in _pins("requirements-gpu.txt")  # the user's CUDA torch stays


# Imported only by an optional capability, and declared as that extra of pyproject.toml instead of pinned: torchao
# (--dtype float8) prints load errors on every LLaVA load under a torch it was not built for (our CPU torch), and
# its release has not been checked against the GPU machines' torch yet.
OPTIONAL = {"torchao": "fp8"}


def test_an_optional_capabilitys_package_is_its_extra():
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for module, extra in OPTIONAL.items():
        assert any(re.match(rf"{module}\b", requirement) for requirement in extras[extra])
        assert module not in _pins("requirements-gpu.txt")


def test_every_package_dali_imports_is_pinned_for_gpu_machines():
    distributions = importlib.metadata.packages_distributions()
    pinned = _pins("requirements-gpu.txt") | {"torch": "the user's"}
    missing = {}
    for module in sorted(_third_party_imports() - set(OPTIONAL)):
        names = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
        if not names & set(pinned):
            missing[module] = sorted(names)
    assert not missing, f"imported by dali/ but not pinned in requirements-gpu.txt: {missing}"


@pytest.mark.slow
def test_the_gpu_set_resolves_as_the_readme_installs_it(tmp_path):
    """The README's GPU step `pip install -r requirements-gpu.txt`, as far as a CPU machine allows: a dry run."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--no-deps",
            "--ignore-installed",
            "-r",
            str(ROOT / "requirements-gpu.txt"),
            "--report",
            str(tmp_path / "report.json"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    resolved = {
        item["metadata"]["name"].lower().replace("_", "-")
        for item in json.loads((tmp_path / "report.json").read_text())["install"]
    }
    assert set(_pins("requirements-gpu.txt")) <= resolved
