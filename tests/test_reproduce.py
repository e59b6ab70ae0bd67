"""`dali reproduce` (#45) on the reduced world: every row over seeds, the clips it scored said exactly, finished
infer folders reused only when made with the same settings; the world's second test set plays Clotho."""

import hashlib
import json
import shutil

import pytest

from dali.cli import main as dali
from dali.data import read_caption_csv
from dali.jsonl import read_jsonl
from dali.runs import read_manifest
from dali.synthetic.world import REDUCED, generate_far_test_set

LIMIT = 4


@pytest.fixture(scope="module")
def test_sets(synthetic, tmp_path_factory):
    """AudioCaps played by a copy of the world's test set that lost one clip's audio (as YouTube loses videos),
    Clotho by the world's second test set."""
    world, _ = synthetic
    root = tmp_path_factory.mktemp("sets")
    audiocaps = root / "audiocaps"
    (audiocaps / "audio").mkdir(parents=True)
    shutil.copy(world / "test.csv", audiocaps / "test.csv")
    shutil.copytree(world / "frames", audiocaps / "frames")
    ids = [clip.id for clip in read_caption_csv(world / "test.csv")]
    lost = ids[1]
    for clip_id in ids:
        if clip_id != lost:
            shutil.copy(world / "audio" / f"{clip_id}.wav", audiocaps / "audio")
    return audiocaps, generate_far_test_set(root, REDUCED), lost


def _flags(pipeline, test_sets, *more, clotho=True):
    world, llava, run = pipeline
    flags = ["--run", str(run), "--audiocaps", str(test_sets[0]), "--seeds", "2"]
    flags += ["--clotho", str(test_sets[1])] if clotho else []
    return ["reproduce", *flags, "--limit", str(LIMIT), "--no-sbert", "--batch-size", "4", *more]


def test_reproduce_scores_every_row_over_seeds_and_says_which_clips(pipeline, test_sets, capsys):
    world, llava, run = pipeline
    audiocaps, clotho, lost = test_sets
    assert dali(_flags(pipeline, test_sets)) == 0
    out = run / "reproduce"
    results = json.loads((out / "results.json").read_text())
    rows = {row["name"]: row for row in results["rows"]}
    assert list(rows) == [
        "AudioCaps, audio",
        "AudioCaps, audio + image",
        "AudioCaps, image",
        "Clotho (cross-domain), audio",
    ]
    first = [clip.id for clip in read_caption_csv(audiocaps / "test.csv")][:LIMIT]
    for name, row in rows.items():
        assert row["seeds"] == [0, 1]
        for seed, folder in row["folders"].items():  # each seed's scores are its infer folder's, read from outside
            manifest = read_manifest(folder)
            assert manifest["metrics"]["scores"]["cider_d"] == row["per_seed"][seed]["cider_d"]
        values = [row["per_seed"][seed]["cider_d"] for seed in ("0", "1")]
        assert row["mean"]["cider_d"] == pytest.approx(sum(values) / 2)
        assert row["std"]["cider_d"] == pytest.approx(abs(values[0] - values[1]) / 2**0.5)
        found = results["clips"][row["set"]]["rows"][name]
        assert (
            found["scored_sha256"]
            == hashlib.sha256("".join(f"{i}\n" for i in sorted(row["scored"])).encode()).hexdigest()
        )
        if row["set"] == "audiocaps":  # the clip without audio is missing where audio is heard, scored from its frame
            assert found["missing"] == ([] if row["modality"] == "image" else [lost])
            assert sorted(row["scored"]) == sorted(set(first) - ({lost} if row["modality"] != "image" else set()))
    assert results["clips"]["audiocaps"]["listed"] == LIMIT and results["clips"]["clotho"]["listed"] == LIMIT
    lines = read_jsonl(out / "per_clip.jsonl")
    assert len(lines) == sum(2 * len(row["scored"]) for row in rows.values())
    assert all(line["caption"] is not None and "cider_d" in line["scores"] for line in lines)
    text = (out / "results.md").read_text()
    assert "± " in text and "DCASE" in text and lost in text and "fense" in text  # named as not computed
    manifest = read_manifest(out)
    assert {"align_dir", "prefix_dir", "audiocaps_list", "clotho_list", "infer_audio_clotho_seed1"} <= set(
        manifest["inputs"]
    )
    assert manifest["metrics"]["scored_sha256"]["audiocaps"]["AudioCaps, audio"] == found_hash(
        results, "AudioCaps, audio"
    )


def found_hash(results: dict, name: str) -> str:
    return results["clips"]["audiocaps"]["rows"][name]["scored_sha256"]


def test_finished_infer_folders_are_reused_only_when_made_with_the_same_settings(pipeline, test_sets, tmp_path, capsys):
    world, llava, run = pipeline
    if not (run / "reproduce" / "manifest.json").is_file():
        assert dali(_flags(pipeline, test_sets)) == 0
    predictions = run / "infer_audio_audiocaps_seed0" / "predictions.jsonl"
    before = predictions.stat().st_mtime_ns, (run / "reproduce" / "results.json").read_text()
    assert dali(_flags(pipeline, test_sets)) == 2  # the results are finished
    assert "pass --overwrite" in capsys.readouterr().err
    assert dali(_flags(pipeline, test_sets, "--overwrite")) == 0  # the table redone, every infer folder reused
    assert predictions.stat().st_mtime_ns == before[0]
    assert json.loads((run / "reproduce" / "results.json").read_text()) == json.loads(before[1])
    other = _flags(pipeline, test_sets, "--temperature", "0.5", "--out", str(tmp_path / "other"))
    assert dali(other) == 2
    error = capsys.readouterr().err
    assert "infer_audio_audiocaps_seed0' is finished but it was made with other settings" in error
    assert "--temperature: 0.2 -> 0.5" in error and "pass --overwrite" in error
    assert predictions.stat().st_mtime_ns == before[0]
    scores = run / "infer_image_audiocaps_seed1" / "scores.json"
    kept = scores.read_bytes()
    scores.write_text(json.dumps(dict(json.loads(kept), scores={"cider_d": 9.0})))  # a table must not print this
    try:
        assert dali(_flags(pipeline, test_sets, "--overwrite")) == 2
        assert "scores.json' is not the file its stage wrote" in capsys.readouterr().err
    finally:
        scores.write_bytes(kept)


def test_greedy_rows_run_once_whatever_the_seeds(pipeline):
    from dali.command_configs import ReproduceConfig
    from dali.flags import parse_config
    from dali.stages.reproduce import seeds_of

    config = parse_config(ReproduceConfig, ["--run", "x", "--seeds", "3", "--seed", "5"])
    assert seeds_of(config) == [5, 6, 7]
    assert seeds_of(parse_config(ReproduceConfig, ["--run", "x", "--seeds", "3", "--strategy", "greedy"])) == [0]


def test_the_worlds_clotho_is_another_domain_and_leaves_the_world_as_it_was(synthetic, tmp_path):
    world, _ = synthetic
    before = {path.name: path.read_bytes() for path in (world / "test.csv", world / "scenes.json")}
    first = generate_far_test_set(tmp_path / "a", REDUCED)
    second = generate_far_test_set(tmp_path / "b", REDUCED)
    assert (first / "test.csv").read_bytes() == (second / "test.csv").read_bytes()  # seeded
    clips = read_caption_csv(first / "test.csv", first / "audio")
    assert len(clips) == REDUCED.test_clips and all(len(c.captions) == 5 and c.audio.is_file() for c in clips)
    assert not (first / "frames").exists()  # audio only, as Clotho
    assert {clip.id for clip in clips}.isdisjoint(c.id for c in read_caption_csv(world / "test.csv"))
    assert {path.name: path.read_bytes() for path in (world / "test.csv", world / "scenes.json")} == before


def test_a_reproduce_stopped_half_way_resumes_reusing_the_rows_it_finished(pipeline, test_sets, tmp_path, monkeypatch):
    """Stopped during its third infer run (as a kill would), `--resume` finishes it: the infer folders finished
    before the stop are reused as they are, the interrupted one resumes."""
    from dali.stages import infer, reproduce

    world, llava, run = pipeline
    out = tmp_path / "results"
    flags = _flags(pipeline, test_sets, "--modalities", "audio", "--out", str(out), "--seed", "7", clotho=False)
    real, calls = infer.main, []

    def stopped_on_the_third(argv):
        calls.append(argv)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(argv)

    monkeypatch.setattr(reproduce.infer, "main", stopped_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        reproduce.main(flags[1:] + ["--seeds", "3"])
    finished = run / "infer_audio_audiocaps_seed7"
    written = (finished / "predictions.jsonl").stat().st_mtime_ns
    assert not (out / "manifest.json").exists()
    assert dali(flags + ["--seeds", "3"]) == 2  # an unfinished run is not silently continued
    monkeypatch.setattr(reproduce.infer, "main", real)
    assert dali(flags + ["--seeds", "3", "--resume"]) == 0
    assert (finished / "predictions.jsonl").stat().st_mtime_ns == written
    results = json.loads((out / "results.json").read_text())
    assert [row["seeds"] for row in results["rows"]] == [[7, 8, 9]]
