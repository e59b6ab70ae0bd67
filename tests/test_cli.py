"""The command line: a user's mistake is one line on stderr and status 2, never a traceback."""

import subprocess
import sys

import pytest

from dali.stage_table import COMMANDS


@pytest.mark.parametrize(
    "argv,message",
    [
        (
            ["-m", "dali.cli", "prefix-tune"],
            "dali prefix-tune: error: the following arguments are required: --llava, --pairs",
        ),
        (["-m", "dali.cli", "infer", "--llava", "x", "--test-list", "t.csv", "--modality", "image"], "--frames-dir"),
        (["-m", "dali.cli", "align", "--config", "no_such.yaml"], "no_such.yaml"),
        (["-m", "dali.cli", "prepare", "no_such_folder", "out"], "dali prepare: error: INPUT"),
        (["-m", "dali.cli", "distill", "--run", "../x"], "dali distill: error: --run '../x' must be a plain name"),
        (["-m", "dali.cli", "app", "--run", "nowhere"], "dali app: error: --run 'nowhere': neither"),
        (["-m", "dali.cli", "app", "--run", "x", "--max-seconds", "0.5"], "--max-seconds must be >= --min-seconds"),
    ],
)
def test_user_mistakes_are_one_line_and_status_2(argv, message, tmp_path):
    done = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("stage", ["prefix_tune", "align", "distill"])
def test_checkpoint_every_zero_is_refused_by_every_training_stage(stage):
    """It was a ZeroDivisionError in align and distill; one shared check now names the flag in all three."""
    import importlib

    from dali.flags import ConfigError, parse_config

    module = importlib.import_module(f"dali.stages.{stage}")
    config_class = {"prefix_tune": "PrefixTuneConfig", "align": "AlignConfig", "distill": "DistillConfig"}[stage]
    required = {
        "prefix_tune": ["--llava", "x", "--pairs", "p.json"],
        "align": ["--llava", "x", "--train-list", "t.json"],
        "distill": ["--align-dir", "a", "--pseudo-dir", "p"],
    }[stage]
    with pytest.raises(ConfigError, match="--checkpoint-every must be between 1 and .*, got 0"):
        parse_config(getattr(module, config_class), [*required, "--checkpoint-every", "0"])


def test_help_groups_the_commands_and_each_command_shows_its_name_defaults_and_required_flags():
    done = subprocess.run([sys.executable, "-m", "dali.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "the method's stages, in order:" in done.stdout and "tools:" in done.stdout
    assert "  align             1b: align" in done.stdout
    done = subprocess.run([sys.executable, "-m", "dali.cli", "align", "--help"], capture_output=True, text=True)
    assert done.stdout.startswith("usage: dali align ") and "--llava LLAVA" in done.stdout.split("\n")[0] + done.stdout
    text = " ".join(done.stdout.split())
    assert "(required)" in text and "(default: ot_att)" in text and "(default: 20)" in text
    assert "--overwrite" in text and "--no-overwrite" not in text  # a switch that is off by default has no negative
    assert "--compile | --no-compile" in text  # one that is on by default keeps its negative


def test_the_readme_shows_the_command_list_that_dali_prints():
    from pathlib import Path

    from dali.cli import usage

    assert usage() in (Path(__file__).resolve().parent.parent / "README.md").read_text()


@pytest.mark.parametrize("command", ["world", "prepare", "import-original", "demo"])
def test_the_tools_help_is_named_and_plain_text(command):
    done = subprocess.run([sys.executable, "-m", "dali.cli", command, "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith(f"usage: dali {command} ") and "``" not in done.stdout


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_flag_has_help(command):
    from dali import command_configs
    from dali.flags import build_parser

    parser = build_parser(getattr(command_configs, COMMANDS[command].config))
    bare = [action.dest for action in parser._actions if not (action.help or "").strip()]
    assert not bare


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_answers_before_any_model_library_loads(command):
    """`dali <command> --help` stays well under a second because torch and transformers are never imported."""
    probe = (
        "import sys\nfrom dali.cli import main\n"
        f"try:\n    main([{command!r}, '--help'])\nexcept SystemExit:\n    pass\n"
        "print('LOADED', sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.stdout.startswith(f"usage: dali {command} ") and "LOADED []" in done.stdout, done.stderr[-2000:]


def test_help_lists_inputs_first_then_decoding_then_the_run_folder_and_system():
    done = subprocess.run([sys.executable, "-m", "dali.cli", "infer", "--help"], capture_output=True, text=True)
    text = done.stdout[done.stdout.index("\noptions:") :]  # past the usage line
    order = [text.index(mark) for mark in ("inputs and settings:", "--test-list", "decoding:", "--strategy")]
    order += [text.index(mark) for mark in ("run folder and system:", "--overwrite")]
    assert order == sorted(order)
