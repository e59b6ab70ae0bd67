"""The command line: a user's mistake is one line on stderr and status 2, never a traceback."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "argv,message",
    [
        (["-m", "dali.cli", "prefix-tune"], "dali prefix-tune: error: --llava is required"),
        (["-m", "dali.cli", "infer", "--llava", "x", "--test-list", "t.csv", "--modality", "image"], "--frames-dir"),
        (["-m", "dali.cli", "align", "--config", "no_such.yaml"], "no_such.yaml"),
        (["-m", "dali.cli", "prepare", "no_such_folder", "out"], "dali prepare: error: INPUT"),
        (["-m", "dali.stages.distill", "--run", "../x"], "dali distill: error: --run '../x' must be a plain name"),
    ],
)
def test_user_mistakes_are_one_line_and_status_2(argv, message, tmp_path):
    done = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr
