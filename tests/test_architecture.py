"""The layering rules of docs/architecture.md: the library never imports the stages, the tools, the world or the CLI;
a tool never imports a stage."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "dali"
ABOVE = ("dali.stages", "dali.tools", "dali.synthetic", "dali.cli")
LIBRARY = sorted(
    path
    for path in PACKAGE.rglob("*.py")
    if path.parent.name not in ("stages", "tools", "synthetic") and path.name != "cli.py"
)


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_library_modules_do_not_import_the_layers_above(path):
    wrong = sorted(name for name in _imports(path) if any(name == a or name.startswith(a + ".") for a in ABOVE))
    assert not wrong, f"{path.relative_to(PACKAGE.parent)} imports {wrong}"


def test_the_check_sees_the_library():
    assert len(LIBRARY) > 20 and PACKAGE / "captioning.py" in LIBRARY and PACKAGE / "clip_list.py" in LIBRARY


def test_stage_folders_are_named_only_in_the_stage_table():
    """A run's folders are the table's (dali/stage_table.py): no module spells one as a path of its own."""
    import re

    from dali.stage_table import STAGES

    folders = "|".join(re.escape(row.folder) for row in STAGES)
    spelled = re.compile(rf'/ "({folders})"|f?"infer_')  # a path joined by hand, or infer's folder spelled out
    found = [
        f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}"
        for path in PACKAGE.rglob("*.py")
        if path.name != "stage_table.py"
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if spelled.search(line)
    ]
    assert not found, found


def test_one_entry_point():
    """Every command starts at dali/cli.py: no other module imports it or runs as a script, and no module keeps a
    global that a command's start sets (the program name comes from the command table)."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "cli.py":
            continue
        text = path.read_text()
        if "dali.cli" in _imports(path) or '__name__ == "__main__"' in text:
            found.append(str(path.relative_to(PACKAGE.parent)))
    assert not found, found
    import dali.flags

    assert not hasattr(dali.flags, "PROG")


def test_every_command_row_names_a_module_with_main_and_a_config():
    import importlib

    from dali import command_configs
    from dali.stage_table import COMMANDS

    for row in COMMANDS.values():
        assert (PACKAGE.parent / (row.module.replace(".", "/") + ".py")).is_file(), row
        assert hasattr(command_configs, row.config), row
    assert callable(importlib.import_module(COMMANDS["evaluate"].module).main)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _dali_imports(path: Path, modules: set[str]) -> set[str]:
    """The dali modules a module imports, at any depth of its code (``from dali import x`` names ``dali.x``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dali"):
            found |= {f"{node.module}.{alias.name}" for alias in node.names} | {node.module} - {"dali"}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return found & modules


def test_no_import_circle():
    """No module reaches itself through the modules it imports (clip_list.py and data.py did, over Clip)."""
    paths = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {name: _dali_imports(path, set(paths)) - {name} for name, path in paths.items()}
    circles = []
    for start in graph:
        seen, frontier = set(), list(graph[start])
        while frontier:
            module = frontier.pop()
            if module == start:
                circles.append(start)
                break
            if module not in seen:
                seen.add(module)
                frontier.extend(graph[module])
    assert not circles, circles


@pytest.mark.parametrize("path", sorted((PACKAGE / "tools").glob("*.py")), ids=lambda p: p.name)
def test_tools_do_not_import_stages(path):
    wrong = sorted(name for name in _imports(path) if name == "dali.stages" or name.startswith("dali.stages."))
    assert not wrong, f"{path.relative_to(PACKAGE.parent)} imports {wrong}"


def test_an_audio_encoder_family_is_one_row():
    """Everything that differs between families is in the row (FAMILIES): no code branches on a family's name, and
    no module but the table and the constants spells one."""
    import re

    from dali.models.audio_encoders import FAMILIES

    names = "|".join(re.escape(name) for name in FAMILIES)
    source = (PACKAGE / "models" / "audio_encoders.py").read_text()
    assert not re.search(r"family (==|!=|in) ", source)
    found = [
        str(path.relative_to(PACKAGE.parent))
        for path in PACKAGE.rglob("*.py")
        if path.name not in ("audio_encoders.py", "constants.py") and re.search(rf'"({names})"', path.read_text())
    ]
    assert not found, found


def test_benchmarks_never_import_stages():
    """A benchmark measures library code (a stage's speed is measured by running its command)."""
    root = PACKAGE.parent / "benchmarks"
    found = [path.name for path in root.glob("*.py") if "dali.stages" in path.read_text()]
    assert not found, found


@pytest.mark.parametrize(
    "path", [*sorted((PACKAGE / "losses").glob("*.py")), PACKAGE / "audio.py"], ids=lambda p: p.name
)
def test_losses_and_audio_never_import_models(path):
    wrong = sorted(name for name in _imports(path) if name.startswith("dali.models"))
    assert not wrong, f"{path.relative_to(PACKAGE.parent)} imports {wrong}"


def test_one_word_per_concept():
    """An encoder's input is its ``features`` (``fbank`` is only CAV-MAE's Kaldi front end, in dali/audio.py and the
    encoder that reads it); a file captioner says what made its captions through ``describe()``, not by reaching
    through ``captioner.models.captioner``."""
    import re

    wrong = [
        str(path.relative_to(PACKAGE.parent))
        for path in [*PACKAGE.rglob("*.py"), *(PACKAGE.parent / "benchmarks").glob("*.py")]
        if re.search(r"""["']fbank["']|fbank_cache|captioner\.models\.captioner""", path.read_text())
    ]
    assert not wrong, wrong
