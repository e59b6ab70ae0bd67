"""The stage folder's state machine (dali.stage_folder, dali.runs.Stage): killed at every step of a replacement,
foreign folders in every shape, links, the lock, and the hygiene of the same code."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dali import stage_folder as folder
from dali.files import file_sha256
from dali.runs import CONFIG, MANIFEST, Stage, StageStateError, check_run_name, read_manifest, require_finished
from dali.stage_folder import LOCK, MARKER, PREVIOUS


def finished_stage(path: Path, text: str = "old", name: str = "test") -> Path:
    stage = Stage(path, name, overwrite=path.exists())
    stage.save_config({"lr": 1.0})
    (path / "prefix.safetensors").write_text(text)
    stage.finish({}, outputs=["prefix.safetensors"])
    stage.close()
    return path


def whole_run(path: Path) -> str | None:
    """The text of the run in ``path`` when it is finished and its file is the one its manifest records."""
    if not (path / MANIFEST).is_file() or not (path / "prefix.safetensors").is_file():
        return None
    if read_manifest(path)["outputs"]["prefix.safetensors"] != file_sha256(path / "prefix.safetensors"):
        return None
    return (path / "prefix.safetensors").read_text()


def snapshot(root: Path) -> dict:
    """Every entry under ``root``, links as their targets (never followed), files as their bytes."""
    found = {}
    for entry in sorted(root.rglob("*")):
        key = str(entry.relative_to(root))
        if entry.is_symlink():
            found[key] = ("link", os.readlink(entry))
        elif entry.is_file():
            found[key] = ("file", entry.read_bytes())
        else:
            found[key] = ("folder",)
    return found


# -- killed at every step of a replacement ---------------------------------------------------------------------
_STEPPER = """
import os, signal, sys
from pathlib import Path
import dali.runs
from dali.runs import Stage

dali.runs.versions = lambda: {}  # the environment's record is not part of the state machine: keep the child light
dali.runs.git_commit = lambda: None
path, scenario, kill_at = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
calls = [0]

def counted(function):
    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return function(*args, **kwargs)
    return wrapper

for name in ("replace", "rename", "unlink", "rmdir", "mkdir", "open"):  # every step that changes the folder
    setattr(os, name, counted(getattr(os, name)))
stage = Stage(path, "test", overwrite=True)
stage.save_config({"lr": 2.0})
(path / "prefix.safetensors").write_text("new")
if scenario == "finishes":
    stage.finish({}, outputs=["prefix.safetensors"])
stage.close()
print("completed", flush=True)
"""


def _after_kill_downstream(path: Path, finished_new: bool) -> None:
    try:
        require_finished(path, "test", "--x")
    except StageStateError:  # the new run had started: the old one waits, whole, in .previous
        assert whole_run(path / PREVIOUS) == "old"
        return
    assert whole_run(path) == ("new" if finished_new else "old")


def _after_kill_resume(path: Path, finished_new: bool) -> None:
    try:
        stage = Stage(path, "test", resume=True)
    except StageStateError as error:  # finished: a resume is refused and the run is kept
        assert "is finished" in str(error) and whole_run(path) == ("new" if finished_new else "old")
        return
    stage.save_config({"lr": 2.0})
    (path / "prefix.safetensors").write_text("new")
    stage.finish({}, outputs=["prefix.safetensors"])
    stage.close()
    assert whole_run(path) == "new" and not (path / PREVIOUS).exists()


def _after_kill_failed_overwrite(path: Path, finished_new: bool) -> None:
    stage = Stage(path, "test", overwrite=True)
    stage.save_config({"lr": 9.0})
    stage.close()  # fails before finishing: whatever run was whole comes back
    assert whole_run(path) == ("new" if finished_new else "old")
    assert sorted(p.name for p in path.iterdir()) == [MARKER, CONFIG, MANIFEST, "prefix.safetensors"]


@pytest.mark.parametrize("scenario", ["finishes", "fails"])
def test_an_overwrite_killed_at_any_step_keeps_the_finished_run_or_its_replacement(tmp_path, scenario):
    """SIGKILL before each rename, removal, folder creation and file opening of an --overwrite; then a downstream
    read, a --resume and a failing --overwrite each find the old run or the new one whole, never neither."""
    completed, steps = False, 0
    while not completed:
        steps += 1
        assert steps < 80, "the scenario never ran to its end"
        path = finished_stage(tmp_path / f"kill{steps}" / "stage")
        done = subprocess.run(
            [sys.executable, "-c", _STEPPER, str(path), scenario, str(steps)], capture_output=True, timeout=60
        )
        completed = b"completed" in done.stdout
        assert completed or done.returncode == -9, done.stderr.decode()[-2000:]
        finished_new = (path / MANIFEST).is_file() and read_manifest(path)["outputs"]["prefix.safetensors"] == (
            file_sha256_of_text(tmp_path, "new")
        )
        for check in (_after_kill_downstream, _after_kill_resume, _after_kill_failed_overwrite):
            copy = tmp_path / f"kill{steps}" / check.__name__
            shutil.copytree(path, copy, symlinks=True)
            check(copy, finished_new)
    assert steps > 8  # the replacement really has that many steps to be killed at


def file_sha256_of_text(tmp_path: Path, text: str) -> str:
    probe = tmp_path / f"probe_{text}"
    probe.write_text(text)
    return file_sha256(probe)


def test_a_finished_run_beside_a_leftover_previous_is_never_lost_to_it(tmp_path, monkeypatch, caplog):
    """The manifest is written, then the old run's removal fails half-way (files held open on NFS)."""
    path = finished_stage(tmp_path / "stage")
    real_rmtree = shutil.rmtree

    def half_rmtree(target, *args, **kwargs):
        next(Path(target).iterdir()).unlink()
        raise OSError(16, "Device or resource busy")

    stage = Stage(path, "test", overwrite=True)
    stage.save_config({"lr": 2.0})
    (path / "prefix.safetensors").write_text("new")
    monkeypatch.setattr(shutil, "rmtree", half_rmtree)
    stage.finish({}, outputs=["prefix.safetensors"])
    stage.close()
    assert "could not remove" in caplog.text and (path / PREVIOUS).is_dir()
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    assert whole_run(path) == "new"
    stage = Stage(path, "test", overwrite=True)  # a later --overwrite that fails brings back the finished run
    stage.save_config({"lr": 3.0})
    stage.close()
    assert whole_run(path) == "new" and not (path / PREVIOUS).exists()


# -- ownership by content --------------------------------------------------------------------------------------
def _foreign(kind: str, path: Path, outside: Path) -> None:
    path.mkdir(parents=True)
    if kind == "config":
        (path / CONFIG).write_text("lr: 1\n")
    elif kind == "jsonl":
        (path / "labels.jsonl").write_text("{}\n")
    elif kind == "folder-named-like-ours":
        (path / "model.safetensors").mkdir()
        (path / "model.safetensors" / "thesis.tex").write_text("years of work")
    elif kind == "other-stage":
        shutil.rmtree(path)
        finished_stage(path, name="align")
    elif kind == "copied-marker-and-user-file":
        (path / MARKER).write_text(json.dumps({"dali_stage_folder": 1, "stage": "test", "id": "ab"}))
        (path / "notes.txt").write_text("mine")
    elif kind == "manifest-of-another-folder":
        finished_stage(outside / "elsewhere")
        (path / MARKER).write_text(json.dumps({"dali_stage_folder": 1, "stage": "test", "id": "ab"}))
        shutil.copy(outside / "elsewhere" / MANIFEST, path / MANIFEST)
    elif kind.startswith("link-"):
        shutil.rmtree(path)
        finished_stage(path)
        target = outside / "precious.txt"
        target.write_text("precious")
        entry = {"link-lock": LOCK, "link-metrics": "metrics.jsonl", "link-part": "part0.jsonl"}.get(kind)
        if kind == "link-previous":
            (outside / "precious_folder").mkdir()
            (path / PREVIOUS).symlink_to(outside / "precious_folder")
        elif entry:
            (path / entry).symlink_to(target)
        else:  # the stage folder itself
            shutil.rmtree(path)
            (outside / "real").mkdir()
            path.symlink_to(outside / "real")


FOREIGN = [
    "config",
    "jsonl",
    "folder-named-like-ours",
    "other-stage",
    "copied-marker-and-user-file",
    "manifest-of-another-folder",
    "link-lock",
    "link-metrics",
    "link-part",
    "link-previous",
    "link-folder",
]


@pytest.mark.parametrize("kind", FOREIGN)
def test_a_folder_that_is_not_this_stages_is_refused_by_every_mode_and_left_byte_identical(tmp_path, kind):
    path, outside = tmp_path / "runs" / "mine", tmp_path / "outside"
    outside.mkdir()
    _foreign(kind, path, outside)
    before = snapshot(tmp_path)
    for flags in ({"overwrite": True}, {"resume": True}, {}, {"overwrite": True, "resume": True}):
        with pytest.raises(StageStateError, match=f"'{path}' is not a dali test stage folder"):
            Stage(path, "test", **flags)
    assert snapshot(tmp_path) == before


def test_a_command_never_writes_into_another_stages_folder_or_its_own_input(tmp_path):
    """``dali infer --align-dir R/align --out R/align --overwrite`` replaced the encoder it loads."""
    align = finished_stage(tmp_path / "R" / "align", name="align")
    before = snapshot(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "dali.cli", "infer", "--llava", "x", "--test-list", "t.csv", "--align-dir", str(align)]
        + ["--out", str(align), "--overwrite"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "is not a dali infer stage folder (its .dali-stage.json names stage 'align')" in done.stderr
    assert snapshot(tmp_path) == before
    own = finished_stage(tmp_path / "R" / "prefix")
    stage = Stage(own, "test", overwrite=True)
    stage.save_config({"lr": 2.0})
    with pytest.raises(StageStateError, match="--init-encoder .* is inside this stage's own folder"):
        stage.add_input("init_encoder", own / "prefix.safetensors")
    stage.close()
    assert whole_run(own) == "old"


def test_links_made_inside_an_open_stage_are_never_followed(tmp_path):
    from dali.jsonl import JsonlWriter, MetricsLog, repair_jsonl

    target = tmp_path / "precious.txt"
    target.write_text("precious, no newline at the end")
    stage = Stage(tmp_path / "stage", "test")
    for name in ("metrics.jsonl", "part0.jsonl"):
        (stage.path / name).symlink_to(target)
    with pytest.raises(OSError):
        MetricsLog(stage.path / "metrics.jsonl").log(step=1)
    with pytest.raises(OSError):
        JsonlWriter(stage.path / "part0.jsonl")
    with pytest.raises(OSError):
        repair_jsonl(stage.path / "part0.jsonl")
    stage.close()
    assert target.read_text() == "precious, no newline at the end"


# -- the lock ---------------------------------------------------------------------------------------------------
def test_the_lock_is_removed_only_by_its_holder_and_a_lock_on_a_removed_file_is_not_taken(tmp_path, monkeypatch):
    import fcntl

    path = tmp_path / "stage"
    stage = Stage(path, "test")
    with pytest.raises(StageStateError, match="in use by another process"):
        Stage(path, "test")
    stage.close()
    assert not path.exists()  # made by a run that wrote nothing: gone, lock included
    path.mkdir()
    real_flock, locked = fcntl.flock, []

    def flock_after_the_holder_removed_it(fd, flags):  # the holder unlinks .lock between our open and our flock
        if not locked:
            os.unlink(path / LOCK)
        locked.append(fd)
        return real_flock(fd, flags)

    monkeypatch.setattr(fcntl, "flock", flock_after_the_holder_removed_it)
    fd = folder.take_lock(path)
    assert len(locked) == 2  # the lock on the removed file was given up, and the folder's current file locked
    assert os.fstat(fd).st_ino == os.stat(path / LOCK).st_ino
    folder.release_lock(path, fd, remove_folder=False)


# -- names, the demo, hygiene -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["x/../../other", "..", "", "a\nb", "tab\there", "x" * 201, "a\\b"])
def test_every_name_that_becomes_a_path_is_one_plain_name(name):
    with pytest.raises(StageStateError, match="--tag .* must be a plain name"):
        check_run_name(name, "--tag")


def test_infer_refuses_a_tag_that_leaves_the_run(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "dali.cli", "infer", "--llava", "x", "--test-list", "t.csv", "--run", "r"]
        + ["--expe-dir", str(tmp_path), "--tag", "x/../../../other/infer_audio", "--overwrite"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "--tag 'x/../../../other/infer_audio' must be a plain name" in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_demo_keeps_the_finished_stages_of_a_run_it_did_not_make(tmp_path, caplog):
    from dali.synthetic import demo
    from dali.synthetic.captioner import MARKER as CAPTIONER_MARKER

    caplog.set_level("INFO", logger="dali")
    llava, run = tmp_path / "captioner", tmp_path / "mine"
    llava.mkdir()
    (llava / CAPTIONER_MARKER).write_text(json.dumps({"key": "demo"}))
    finished_stage(run / "prefix", "the user's", name="prefix_tune")
    before = snapshot(run)
    since = demo._made_since(run, llava, None)
    calls = []
    demo.run_stage(type("Stage", (), {"main": staticmethod(calls.append)}), run / "prefix", [], since=since)
    assert calls == [] and snapshot(run) == before  # kept, and no made_by.json claims the run
    assert "was not made by the demo" in caplog.text and "reusing finished stage" in caplog.text


def test_resume_repairs_a_torn_metrics_line_and_sweeps_a_killed_writers_temporaries(tmp_path):
    path = tmp_path / "stage"
    stage = Stage(path, "test")
    stage.save_config({"lr": 1.0})
    stage.metrics().log(step=1)
    stage.close()
    with open(path / "metrics.jsonl", "a") as stream:
        stream.write('{"step": 2, "lo')  # killed mid-line
    (path / ".prefix.safetensors.k3j2.tmp").write_bytes(b"half")
    stage = Stage(path, "test", resume=True)
    stage.metrics().log(step=2)
    assert [record["step"] for record in stage.metrics().read()] == [1, 2]
    assert not list(path.glob(".*.tmp"))
    stage.close()


def test_weights_get_the_mode_of_every_other_file(tmp_path):
    """safetensors replaces the file it writes: the mode set before it was lost (0600)."""
    import torch
    from safetensors.torch import save_file

    from dali.files import atomic_write, atomic_write_text

    mask = os.umask(0o022)
    try:
        atomic_write(tmp_path / "w.safetensors", lambda tmp: save_file({"w": torch.zeros(2)}, str(tmp)))
        atomic_write_text(tmp_path / "other.txt", "x")
    finally:
        os.umask(mask)
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "other.txt").stat().st_mode & 0o777 == 0o644


def test_prepare_never_reads_its_own_outputs_back(tmp_path, write_wav):
    from dali.tools import prepare

    source = tmp_path / "media"
    source.mkdir()
    shutil.copy(write_wav("clip.wav", seconds=1.0), source / "clip.wav")
    for _ in range(2):  # the second run finds the first one's wav files under its input folder
        assert prepare.main([str(source), str(source / "prepared"), "--workers", "1"]) == 0
    report = [json.loads(line) for line in (source / "prepared" / "prepare_report.jsonl").read_text().splitlines()]
    assert [record["id"] for record in report] == ["clip"]


def test_a_killed_holders_forked_children_do_not_keep_its_folder_locked(tmp_path):
    """A stage's loader workers are forked while it holds its folder; killed, it must not leave them holding it."""
    holder = (
        "import os, signal, sys, time\nfrom pathlib import Path\nfrom dali import stage_folder\n"
        "assert stage_folder.take_lock(Path(sys.argv[1])) is not None\n"
        "if os.fork() == 0:\n    time.sleep(20)\n    os._exit(0)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    subprocess.run([sys.executable, "-c", holder, str(tmp_path)], env=env, timeout=60)
    fd = folder.take_lock(tmp_path)  # its child still sleeps
    assert fd is not None
    folder.release_lock(tmp_path, fd, remove_folder=False)
