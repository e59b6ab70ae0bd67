"""The fault suite, safety: no command deletes what it did not make, runs code from a file, or loses work to a
bad name."""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from dali.jsonl import read_jsonl
from dali.models.checkpoints import CheckpointError
from dali.run import Run
from dali.runs import CONFIG, MANIFEST, Stage, StageStateError, check_run_name, read_manifest, stage_main
from dali.stage_folder import MARKER
from dali.training import load_checkpoint, save_checkpoint


class _Payload:
    """A pickle that runs code when loaded without weights_only."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_resume_never_unpickles_code(tmp_path):
    marker = tmp_path / "code_ran"
    torch.save({"step": 3, "prefix": _Payload(marker)}, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="checkpoint.pt"):
        load_checkpoint(tmp_path / "checkpoint.pt")
    assert not marker.exists()


def test_training_state_round_trips_through_the_safe_loader(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[2, 4])
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    save_checkpoint(
        tmp_path / "c.pt",
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "bad": [{"id": "x", "reason": "r"}],
        },
    )
    torch.rand(10)
    state = load_checkpoint(tmp_path / "c.pt")
    assert torch.equal(torch.rand(3), expected)  # the generators are back where the checkpoint left them
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    assert state["bad"] == [{"id": "x", "reason": "r"}]


def _finished_stage(path, text="old", name="test"):
    stage = Stage(path, name)
    stage.save_config({"lr": 1.0})
    (path / "prefix.safetensors").write_text(text)
    stage.finish({}, outputs=["prefix.safetensors"])
    stage.close()


def test_overwrite_refuses_a_folder_that_is_not_a_stage_folder(tmp_path):
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "chapter1.tex").write_text("years of work")
    with pytest.raises(StageStateError, match="not a dali test stage folder"):
        Stage(thesis, "test", overwrite=True)
    _finished_stage(tmp_path / "stage")
    (tmp_path / "stage" / "notes.txt").write_text("mine")  # a stage folder with a user's file in it
    with pytest.raises(StageStateError, match="notes.txt"):
        Stage(tmp_path / "stage", "test", overwrite=True)
    assert (thesis / "chapter1.tex").read_text() == "years of work" and (tmp_path / "stage" / MANIFEST).exists()


def test_overwrite_keeps_the_old_run_until_the_new_one_finishes(tmp_path):
    path = tmp_path / "stage"
    _finished_stage(path)

    @stage_main
    def failing(argv):
        stage = Stage(path, "test", overwrite=True)
        assert (path / "prefix.safetensors").read_text() == "old"  # nothing replaced before the first write
        stage.save_config({"lr": 2.0})
        (path / "prefix.safetensors").write_text("half")
        raise RuntimeError("killed by a bug")

    with pytest.raises(RuntimeError):
        failing([])
    assert (path / "prefix.safetensors").read_text() == "old" and (path / MANIFEST).exists()
    assert yaml.safe_load((path / CONFIG).read_text()) == {"lr": 1.0}
    assert sorted(p.name for p in path.iterdir()) == [MARKER, CONFIG, MANIFEST, "prefix.safetensors"]

    @stage_main
    def succeeding(argv):
        stage = Stage(path, "test", overwrite=True)
        stage.save_config({"lr": 3.0})
        (path / "prefix.safetensors").write_text("new")
        stage.finish({}, outputs=["prefix.safetensors"])
        return 0

    succeeding([])
    assert (path / "prefix.safetensors").read_text() == "new"
    assert sorted(p.name for p in path.iterdir()) == [MARKER, CONFIG, MANIFEST, "prefix.safetensors"]


def test_overwrite_with_a_wrong_llava_leaves_the_finished_stage(tmp_path, tiny_llava_dir):
    from dali.stages import prefix_tune

    out = tmp_path / "prefix"
    _finished_stage(out, name="prefix_tune")
    before = read_manifest(out)
    with pytest.raises(FileNotFoundError, match="no_such_llava"):
        prefix_tune.main(
            ["--llava", str(tmp_path / "no_such_llava"), "--pairs", "x.json", "--out", str(out), "--overwrite"]
        )
    assert read_manifest(out) == before and (out / "prefix.safetensors").read_text() == "old"


@pytest.mark.parametrize("name", ["/tmp/elsewhere", "../up", "a/b", "..", "", "a\\b"])
def test_a_run_name_is_a_name(tmp_path, name):
    with pytest.raises(StageStateError, match="plain name"):
        Run.of(argparse.Namespace(expe_dir=str(tmp_path), run=name)).at("prefix")
    with pytest.raises(StageStateError, match="plain name"):
        check_run_name(name)


def test_the_demo_refuses_a_path_as_run_name(tmp_path):
    from dali.synthetic import demo

    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("x")
    with pytest.raises(StageStateError, match="plain name"):
        demo.main(["--run", str(victim), "--overwrite", "--world", str(tmp_path / "world")])
    assert (victim / "keep.txt").exists()


_HOLDER = """
import sys, time
from dali.runs import Stage
stage = Stage(sys.argv[1], "test")
stage.save_config({"a": 1})
print("locked", flush=True)
time.sleep(60)
"""


def test_a_second_writer_is_refused_while_the_first_lives(tmp_path):
    path = tmp_path / "stage"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for flags in ({"resume": True}, {"overwrite": True}):
            with pytest.raises(StageStateError, match=f"in use by another process \\(PID {holder.pid}\\)"):
                Stage(path, "test", **flags)
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=10)
        stage = Stage(path, "test", resume=True)  # the kernel released the dead holder's lock
        stage.close()
    finally:
        holder.kill()
        holder.wait()


def test_resume_refuses_other_settings_and_names_the_flag(tmp_path):
    path = tmp_path / "stage"
    stage = Stage(path, "test")
    stage.save_config({"temperature": 0.2, "strategy": "sample", "num_workers": 4, "resume": False})
    (path / "part-000.jsonl").write_text('{"id": "a", "caption": "x"}\n')
    stage.close()
    changed = Stage(path, "test", resume=True)
    with pytest.raises(StageStateError, match="--temperature: 0.2 -> 0.7"):
        changed.save_config({"temperature": 0.7, "strategy": "sample", "num_workers": 4, "resume": True})
    changed.close()
    stage = Stage(path, "test", resume=True)  # how it runs may change, what it computes may not
    stage.save_config({"temperature": 0.2, "strategy": "sample", "num_workers": 0, "resume": True})
    stage.close()
    assert (path / "part-000.jsonl").exists()


def test_a_run_that_failed_on_its_inputs_does_not_block_the_next(tmp_path):
    path = tmp_path / "stage"
    stopped = Stage(path, "test")
    stopped.save_config({"lr": 1.0})  # all that a run that stopped on a bad input leaves
    stopped.close()
    stage = Stage(path, "test")
    stage.close()
    Stage(tmp_path / "fresh", "test").close()
    assert not (tmp_path / "fresh").exists()  # made by a run that wrote nothing, so removed


def test_killed_overwrite_says_where_the_old_run_is(tmp_path):
    path = tmp_path / "stage"
    _finished_stage(path)
    script = f"""
import json
import os
from dali.runs import Stage
stage = Stage({str(path)!r}, "test", overwrite=True)
stage.save_config({{"lr": 2.0}})
os.kill(os.getpid(), 9)
"""
    subprocess.run([sys.executable, "-c", script])
    assert (path / ".previous" / "prefix.safetensors").read_text() == "old"
    with pytest.raises(StageStateError, match="kept in .previous"):
        Stage(path, "test")
    again = Stage(path, "test", overwrite=True)  # a second replacement that fails too restores the old run
    again.save_config({"lr": 3.0})
    again.close()
    assert (path / "prefix.safetensors").read_text() == "old" and not (path / ".previous").exists()


# -- bad names and bad files do not stop a whole run --------------------------------------------------------
def test_prepare_reports_long_and_undecodable_names_per_file(tmp_path, write_wav):
    from dali.tools import prepare

    media = tmp_path / "media"
    media.mkdir()
    good = write_wav("good.wav")
    os.replace(good, media / "good.wav")
    long_name = "l" * 246 + ".wav"  # 250 bytes: legal, but a temporary name built on it would not be
    (media / long_name).write_bytes((media / "good.wav").read_bytes())
    odd = os.fsencode(str(media)) + b"/caf\xe9.wav"  # Latin-1 bytes: not UTF-8
    with open(odd, "wb") as stream:
        stream.write((media / "good.wav").read_bytes())
    out = tmp_path / "out"
    assert prepare.main([str(media), str(out), "--workers", "2"]) == 0
    report = {r["id"]: r for r in read_jsonl(out / "prepare_report.jsonl")}
    assert len(report) == 3 and report["good"]["status"] == "ok" and report["l" * 246]["status"] == "ok"
    assert all(r["status"] in ("ok", "failed") for r in report.values())  # the odd name is that file's own fate


def test_a_clip_id_that_is_not_utf8_is_written_and_read_back(tmp_path):
    from dali.jsonl import JsonlWriter, atomic_write_jsonl

    records = [{"id": "caf\udce9", "caption": "un café"}]
    with JsonlWriter(tmp_path / "part.jsonl") as writer:
        writer.write(records)
    atomic_write_jsonl(tmp_path / "all.jsonl", records)
    assert read_jsonl(tmp_path / "part.jsonl") == records == read_jsonl(tmp_path / "all.jsonl")


def test_presets_are_checked_like_flags(tmp_path):
    from dali.command_configs import InferConfig
    from dali.flags import ConfigError, parse_config

    for text, match in (("projector: distiled\n", "projector"), ("dtype: float64\n", "dtype")):
        (tmp_path / "p.yaml").write_text("llava: x\ntest_list: t.csv\n" + text)
        with pytest.raises(ConfigError, match=match):
            parse_config(InferConfig, ["--config", str(tmp_path / "p.yaml")])


def test_a_stages_own_config_is_a_valid_preset(tmp_path):
    from dali.command_configs import InferConfig
    from dali.flags import config_to_dict, parse_config

    config = parse_config(InferConfig, ["--llava", "x", "--test-list", "t.csv", "--temperature", "0.5"])
    (tmp_path / CONFIG).write_text(yaml.safe_dump(config_to_dict(config)))
    assert parse_config(InferConfig, ["--config", str(tmp_path / CONFIG)]) == config


def test_forged_encoder_metadata_is_a_checkpoint_error(tmp_path):
    from safetensors.torch import load_file, save_file

    from dali.models.cav_mae import CAVMAEAudioEncoder, CAVMAEConfig, load_audio_encoder, save_audio_encoder

    save_audio_encoder(
        CAVMAEAudioEncoder(CAVMAEConfig(embed_dim=16, depth_audio=1, num_heads=2, proj_dim=8)),
        tmp_path / "e.safetensors",
    )
    state = load_file(tmp_path / "e.safetensors")
    for metadata in ('{"embed_dim": 4096, "depth_audio": 48}', "not json", '{"no_such_field": 1}', "[1, 2]"):
        save_file(state, tmp_path / "forged.safetensors", metadata={"dali.cav_mae_config": metadata})
        with pytest.raises(CheckpointError, match="forged.safetensors"):
            load_audio_encoder(tmp_path / "forged.safetensors")


def test_deep_json_bom_csv_and_evaluate_beside_a_finished_stage(tmp_path):
    from dali.data import DataError, read_caption_csv, read_cavmae_json

    (tmp_path / "deep.json").write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(DataError, match="deep.json"):
        read_cavmae_json(tmp_path / "deep.json")
    (tmp_path / "bom.csv").write_bytes("youtube_id,caption\nabc,a dog barks\n".encode("utf-8-sig"))
    assert read_caption_csv(tmp_path / "bom.csv")[0].captions == ["a dog barks"]


def test_evaluate_never_writes_into_a_finished_stage(tmp_path):
    from dali.tools import evaluate

    stage = tmp_path / "infer_audio"
    stage.mkdir()
    (stage / "predictions.jsonl").write_text('{"id": "abc", "caption": "a dog barks"}\n')
    (stage / MANIFEST).write_text("{}")
    (tmp_path / "test.csv").write_text("youtube_id,caption\nabc,a dog barks\n")
    argv = ["--predictions", str(stage / "predictions.jsonl"), "--test-list", str(tmp_path / "test.csv"), "--no-sbert"]
    assert evaluate.main(argv + ["--no-spice"]) == 0
    assert not (stage / "scores.json").exists() and (tmp_path / "infer_audio_rescored" / "scores.json").exists()


def test_written_files_follow_the_umask(tmp_path):
    from dali.files import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644


# -- processes and scale ------------------------------------------------------------------------------------
_POOL_PARENT = """
import sys, time
from dali.workers import worker_pool
pool = worker_pool(2)
futures = [pool.submit(time.sleep, 60) for _ in range(2)]
time.sleep(1.0)
print(" ".join(str(p) for p in pool._processes), flush=True)
time.sleep(60)
"""


def test_workers_die_with_their_parent(tmp_path):
    parent = subprocess.Popen([sys.executable, "-c", _POOL_PARENT], stdout=subprocess.PIPE, text=True)
    workers = [int(p) for p in parent.stdout.readline().split()]
    assert len(workers) == 2
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait(timeout=10)
    deadline = time.time() + 10
    while time.time() < deadline and any(_alive(p) for p in workers):
        time.sleep(0.1)
    assert not any(_alive(p) for p in workers)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stream:
            return stream.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_prepare_finds_duplicate_ids_among_200000_files(tmp_path):
    from dali.flags import ConfigError
    from dali.tools import prepare

    listing = tmp_path / "list.txt"  # the quadratic check took about 15 minutes on this list; a linear one, a second
    listing.write_text("".join(f"/nowhere/clip{i}.wav\n" for i in range(200_000)) + "/else/clip7.wav\n")
    with pytest.raises(ConfigError, match="clip7"):
        prepare.main([str(listing), str(tmp_path / "out"), "--workers", "1"])


def test_prepare_decodes_only_the_first_seconds_of_a_long_file(tmp_path):
    import numpy as np
    import soundfile

    from dali.tools import prepare

    media = tmp_path / "media"
    media.mkdir()
    soundfile.write(media / "hour.flac", np.zeros(16_000 * 60 * 10, dtype=np.float32), 16_000)  # ten minutes
    assert prepare.main([str(media), str(tmp_path / "out"), "--workers", "1"]) == 0
    (record,) = read_jsonl(tmp_path / "out" / "prepare_report.jsonl")
    assert record["status"] == "ok" and record["cut_at_s"] == pytest.approx(10.255) and record["seconds"] < 10.3
    assert soundfile.info(tmp_path / "out" / "audio" / "hour.wav").duration < 10.3


def test_a_full_disk_names_the_file(tmp_path, monkeypatch):
    import errno

    from dali.files import atomic_write

    def fail(tmp):
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos")

    monkeypatch.setattr(os, "statvfs", lambda path: type("S", (), {"f_bavail": 0, "f_frsize": 4096})())
    with pytest.raises(OSError, match="no space left on device while writing '.*checkpoint.pt'") as error:
        atomic_write(tmp_path / "checkpoint.pt", fail)
    assert error.value.errno == errno.ENOSPC and not list(tmp_path.iterdir())


class _RecordingStage:
    """A stand-in for the prefix-tuning stage's module: records each argv it is run with and finishes its folder,
    with the config that argv gives (as the stage saves it)."""

    ARGV = ["--llava", "captioner", "--pairs", "pairs.json"]

    def __init__(self):
        self.calls = []
        self.__name__ = "dali.stages.prefix_tune"

    def main(self, argv):
        from dali.command_configs import PrefixTuneConfig
        from dali.flags import config_to_dict, parse_config
        from dali.stage_folder import CONFIG

        self.calls.append(argv)
        out = Path(argv[argv.index("--out") + 1])
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG).write_text(yaml.safe_dump(config_to_dict(parse_config(PrefixTuneConfig, argv))))
        (out / MANIFEST).write_text("{}")
        return 0


def test_the_demo_redoes_stages_made_with_another_captioner_or_encoder_start(tmp_path):
    from dali.synthetic import demo
    from dali.synthetic.captioner import MARKER
    from dali.synthetic.encoder_pretraining import ENCODER_FILE
    from dali.synthetic.encoder_pretraining import MARKER as PRETRAINING_MARKER

    run, llava, stage = tmp_path / "run", tmp_path / "captioner", _RecordingStage()
    llava.mkdir()
    (llava / MARKER).write_text(json.dumps({"key": "first"}))
    since = demo._made_since(run, llava, None)
    demo.run_stage(stage, run / "prefix", stage.ARGV, since=since)
    assert demo._made_since(run, llava, None) == since  # same captioner: the finished stage is reused
    demo.run_stage(stage, run / "prefix", stage.ARGV, since=since)
    assert len(stage.calls) == 1 and "--overwrite" not in stage.calls[0]
    time.sleep(0.01)
    (llava / MARKER).write_text(json.dumps({"key": "retrained"}))
    since = demo._made_since(run, llava, None)  # another captioner: the old stage is redone, a new one is kept
    demo.run_stage(stage, run / "prefix", stage.ARGV, since=since)
    demo.run_stage(stage, run / "prefix", stage.ARGV, since=since)
    assert len(stage.calls) == 2 and "--overwrite" in stage.calls[1]
    time.sleep(0.01)
    pretrained = tmp_path / "encoder"
    pretrained.mkdir()
    (pretrained / PRETRAINING_MARKER).write_text(json.dumps({"key": "pretrained"}))
    since = demo._made_since(run, llava, pretrained / ENCODER_FILE)  # a pretrained start, after a random one
    demo.run_stage(stage, run / "prefix", stage.ARGV, since=since)
    assert len(stage.calls) == 3 and "--overwrite" in stage.calls[2]
    assert demo._made_since(run, llava, pretrained / ENCODER_FILE) == since


def test_the_demo_redoes_a_stage_finished_with_other_settings_than_its_preset_now_gives(tmp_path, caplog):
    """A preset or flag changed since the run was made (a new release): the stage is redone, never reused."""
    from dali.synthetic import demo
    from dali.synthetic.captioner import MARKER

    caplog.set_level("INFO", logger="dali")
    run, llava, stage = tmp_path / "run", tmp_path / "captioner", _RecordingStage()
    llava.mkdir()
    (llava / MARKER).write_text(json.dumps({"key": "first"}))
    since = demo._made_since(run, llava, None)
    demo.run_stage(stage, run / "prefix", stage.ARGV, since=since)
    demo.run_stage(stage, run / "prefix", stage.ARGV, since=since)
    assert len(stage.calls) == 1  # the same settings: reused
    demo.run_stage(stage, run / "prefix", [*stage.ARGV, "--epochs", "7"], since=since)
    assert len(stage.calls) == 2 and "--overwrite" in stage.calls[1]
    assert "is redone: it was made with other settings (--epochs: 500 -> 7)" in caplog.text
    demo.run_stage(stage, run / "prefix", [*stage.ARGV, "--epochs", "7"], since=since)
    assert len(stage.calls) == 2  # now made with them: reused
