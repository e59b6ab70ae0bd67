"""One smoke test per stage on the reduced synthetic world, then the five scripts chained."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import align_flags, free_port, prefix_flags

from dali.jsonl import read_jsonl
from dali.models.decoding import DecodingOptions
from dali.runs import StageStateError, read_manifest
from dali.stages import align, distill, infer, prefix_tune, pseudo_label
from dali.tools import evaluate

ROOT = Path(__file__).resolve().parent.parent


def test_prefix_tuning_writes_prefix_metrics_and_manifest_and_refuses_reruns(pipeline):
    world, llava, run = pipeline
    folder = run / "prefix"
    manifest = read_manifest(folder)
    assert manifest["stage"] == "prefix_tune" and manifest["outputs"]["prefix.safetensors"]
    assert manifest["inputs"]["pairs"]["sha256"] and manifest["versions"]["torch"]
    assert len(read_jsonl(folder / "metrics.jsonl")) == 4
    assert (folder / "config.yaml").exists() and not (folder / "checkpoint.pt").exists()
    folder = shutil.copytree(folder, run.parent / "prefix_rerun")  # the pipeline's own prefix stays as it is
    argv = ["--llava", str(llava), "--pairs", str(world / "prefix_pairs.json"), "--epochs", "1", "--out", str(folder)]
    with pytest.raises(StageStateError, match="--overwrite"):
        prefix_tune.main(argv)
    assert prefix_tune.main(argv + ["--overwrite", "--num-prefix-tokens", "4"]) == 0
    assert len(read_jsonl(folder / "metrics.jsonl")) == 1
    # run in-process (as the demo runs every stage), the manifest still holds the command that reruns the stage
    rerun = [sys.executable, "-m", "dali.cli", "prefix-tune", *argv, "--overwrite", "--num-prefix-tokens", "4"]
    assert read_manifest(folder)["command"] == rerun


@pytest.mark.parametrize("method,solver", [("mmd", "emd"), ("ot", "emd"), ("ot", "sinkhorn"), ("ot_att", "sinkhorn")])
def test_alignment_methods(synthetic, tmp_path, method, solver):
    world, llava = synthetic
    out = tmp_path / "align"
    assert align.main(align_flags(world, llava, method) + ["--ot-solver", solver, "--out", str(out)]) == 0
    records = read_jsonl(out / "metrics.jsonl")
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert [r["epoch"] for r in records if "val_loss" in r] == [1, 2]
    assert (out / "token_weights.safetensors").exists() == (method == "ot_att")
    if method == "ot_att":  # the scorers are frozen in epoch 1, then weighted by the first lambda
        assert {r["entropy_weight"] for r in records if r.get("epoch") == 1 and "loss" in r} == {0.0}
        assert {r["entropy_weight"] for r in records if r.get("epoch") == 2 and "loss" in r} == {500.0}


def test_alignment_loss_falls_on_the_synthetic_world(synthetic, tmp_path):
    """Stage 1b learns: over six epochs its training and validation OT losses fall, and the encoder it keeps is
    the one of the best validation epoch."""
    world, llava = synthetic
    out = tmp_path / "align"
    flags = align_flags(world, llava, "ot") + ["--epochs", "6", "--lr", "0.001", "--lr-decay-start", "100"]
    flags[flags.index("--max-steps-per-epoch") + 1] = "100"
    assert align.main(flags + ["--out", str(out)]) == 0
    records = read_jsonl(out / "metrics.jsonl")
    train = {e: [r["loss"] for r in records if r.get("epoch") == e and "loss" in r] for e in range(1, 7)}
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(val) == 6 and val[-1] < 0.95 * val[0]
    assert sum(train[6]) / len(train[6]) < 0.95 * sum(train[1]) / len(train[1])
    assert json.loads((out / "manifest.json").read_text())["metrics"]["best_val_loss"] == min(val)


def test_validation_scores_only_clips_whose_frame_was_cached(synthetic, tmp_path):
    world, llava = synthetic
    listing = json.loads((world / "val.json").read_text())
    broken = dict(listing["data"][0], video_id="no_frame", video_path=str(tmp_path / "nowhere"))
    (tmp_path / "val_broken.json").write_text(json.dumps({"data": listing["data"] + [broken]}))
    losses = {}
    # a list outside the world with no --data-root: none of its files can be found
    runs = {"clean": [world / "val.json"], "broken": [tmp_path / "val_broken.json", "--data-root", str(world)]}
    runs["no_frames"] = [tmp_path / "val_broken.json"]
    for name, (val_list, *extra) in runs.items():
        flags = align_flags(world, llava, "mmd") + ["--epochs", "1", "--out", str(tmp_path / name), *extra]
        flags[flags.index("--val-list") + 1] = str(val_list)
        assert align.main(flags) == 0
        losses[name] = [r["val_loss"] for r in read_jsonl(tmp_path / name / "metrics.jsonl") if "val_loss" in r]
    assert len(losses["clean"]) == 1 and losses["broken"] == losses["clean"]
    assert "no_frame" in (tmp_path / "broken" / "skipped.jsonl").read_text()
    assert losses["no_frames"] == [] and (tmp_path / "no_frames" / "audio_encoder.safetensors").exists()


@pytest.mark.gpu
def test_attentive_alignment_trains_compiled_on_gpu(synthetic, tmp_path):
    """On a GPU the encoder's forward is compiled; its backward may run once, so the scorers' pass comes first."""
    world, llava = synthetic
    out = tmp_path / "align"
    flags = align_flags(world, llava, "ot_att") + ["--ot-solver", "sinkhorn", "--device", "cuda", "--out", str(out)]
    assert align.main(flags) == 0
    records = read_jsonl(out / "metrics.jsonl")
    assert {r["entropy_weight"] for r in records if r.get("epoch") == 2 and "loss" in r} == {500.0}


def test_downstream_refuses_unfinished_upstream(pipeline, tmp_path):
    world, llava, run = pipeline
    (tmp_path / "align").mkdir()
    with pytest.raises(StageStateError, match="--align-dir"):
        pseudo_label.main(
            [
                "--llava",
                str(llava),
                "--clips",
                str(world / "pseudo.json"),
                "--align-dir",
                str(tmp_path / "align"),
                "--prefix-dir",
                str(run / "prefix"),
                "--out",
                str(tmp_path / "p"),
            ]
        )


def test_pseudo_labels_distillation_and_inference(pipeline):
    world, llava, run = pipeline
    assert (
        pseudo_label.main(
            [
                "--llava",
                str(llava),
                "--clips",
                str(world / "pseudo.json"),
                "--run",
                "run",
                "--expe-dir",
                str(run.parent),
                "--batch-size",
                "8",
                "--num-workers",
                "0",
                "--max-new-tokens",
                "12",
            ]
        )
        == 0
    )
    captions = read_jsonl(run / "pseudo_label" / "pseudo_captions.jsonl")
    clips = json.loads((world / "pseudo.json").read_text())["data"]
    assert [c["id"] for c in captions] == [c["video_id"] for c in clips][: len(captions)]
    assert len(captions) + len(read_jsonl(run / "pseudo_label" / "skipped.jsonl")) == len(clips)
    assert not list((run / "pseudo_label").glob("part-*"))

    assert (
        distill.main(
            [
                "--llava",
                str(llava),
                "--run",
                "run",
                "--expe-dir",
                str(run.parent),
                "--batch-size",
                "8",
                "--epochs",
                "2",
                "--num-workers",
                "0",
                "--cache-audio-tokens",
            ]
        )
        == 0
    )
    assert read_manifest(run / "distill")["metrics"]["steps"] == 2 * -(-len(captions) // 8)

    common = [
        "--llava",
        str(llava),
        "--test-list",
        str(world / "test.csv"),
        "--audio-dir",
        str(world / "audio"),
        "--run",
        "run",
        "--expe-dir",
        str(run.parent),
        "--batch-size",
        "6",
        "--num-workers",
        "0",
        "--max-new-tokens",
        "10",
        "--no-sbert",
    ]
    assert infer.main(common + ["--modality", "audio"]) == 0
    out = run / "infer_audio"
    predictions = read_jsonl(out / "predictions.jsonl")
    assert len(predictions) == 12 and {p["modality"] for p in predictions} == {"audio"}
    assert predictions[0]["decoding"]["strategy"] == "sample"
    scores = json.loads((out / "scores.json").read_text())
    assert set(scores["scores"]) >= {"bleu_4", "meteor", "rouge_l", "cider_d"}
    assert ("spice" in scores["scores"]) != ("spice" in scores["unavailable"])
    assert "cider_d" in (out / "scores.md").read_text()
    for modality in ("image", "audio_vis"):
        assert (
            infer.main(
                common
                + [
                    "--modality",
                    modality,
                    "--frames-dir",
                    str(world / "frames"),
                    "--use-prefix",
                    "--projector",
                    "llava",
                    "--limit",
                    "4",
                ]
            )
            == 0
        )
        assert len(read_jsonl(run / f"infer_{modality}" / "predictions.jsonl")) == 4

    assert (
        evaluate.main(
            [
                "--predictions",
                str(out / "predictions.jsonl"),
                "--test-list",
                str(world / "test.csv"),
                "--out",
                str(run / "rescored"),
                "--no-sbert",
            ]
        )
        == 0
    )
    rescored = json.loads((run / "rescored" / "scores.json").read_text())
    assert rescored["scores"] == scores["scores"]


def _token_f1(candidate: str, reference: str) -> float:
    """Harmonic mean of word precision and recall (multiset overlap), as in extractive QA scoring."""
    from collections import Counter

    a, b = Counter(candidate.lower().split()), Counter(reference.lower().split())
    common = sum((a & b).values())
    return 0.0 if not common else 2 * common / (sum(a.values()) + sum(b.values()))


def test_distillation_keeps_the_step_with_the_lowest_held_out_loss(pipeline, tmp_path):
    world, llava, run = pipeline
    pseudo = _pseudo_captions(pipeline, tmp_path)
    records = read_jsonl(pseudo / "pseudo_captions.jsonl")
    flags = ["--epochs", "30", "--val-fraction", "0.1", "--patience", "5"]
    assert distill.main(_distill_flags(pipeline, pseudo, tmp_path / "distill") + flags) == 0
    metrics = read_manifest(tmp_path / "distill")["metrics"]
    assert metrics["held_out"] == 3 and metrics["clips"] == len(records) - 3
    assert 1 <= metrics["best_step"] <= metrics["steps"] <= metrics["planned_steps"]
    logged = [r for r in read_jsonl(tmp_path / "distill" / "metrics.jsonl") if "val_loss" in r]
    best = min(logged, key=lambda r: r["val_loss"])
    assert best["step"] == metrics["best_step"] and best["val_loss"] == pytest.approx(metrics["best_val_loss"])
    if metrics["stopped_early"]:  # stopped once 5 evaluations in a row brought no lower loss
        assert [r["best"] for r in logged[-5:]] == [False] * 5 and metrics["steps"] < metrics["planned_steps"]


@pytest.mark.slow
def test_distilled_student_is_closer_to_its_pseudo_captions_than_the_undistilled_model(pipeline, tmp_path):
    """Any correct distillation: on its own training clips, the student's greedy captions match the pseudo-captions
    it was trained on better than the undistilled model's (LLaVA's projector and the prefix) do."""
    world, llava, run = pipeline
    pseudo = _pseudo_captions(pipeline, tmp_path)
    # The reduced world's 2-step alignment makes its teacher say one thing of every clip, which no student can
    # beat; here the teacher is an oracle: each clip's true audio caption, so the captions differ with the audio.
    truth = {scene["id"]: _true_caption(scene) for scene in json.loads((world / "scenes.json").read_text())["pseudo"]}
    records = [r | {"caption": truth[r["id"]]} for r in read_jsonl(pseudo / "pseudo_captions.jsonl")]
    (pseudo / "pseudo_captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    flags = ["--epochs", "150", "--lr", "3e-3", "--allow-modified"]  # 600 steps: the paper's one epoch is ~500;
    # --allow-modified: the pseudo-captions were replaced above, knowingly
    assert distill.main(_distill_flags(pipeline, pseudo, tmp_path / "distill") + flags) == 0
    listing = tmp_path / "own_clips.csv"  # the training clips, their pseudo-captions as the references
    listing.write_text("youtube_id,caption\n" + "".join(f'{r["id"]},"{r["caption"]}"\n' for r in records))
    test = [
        "--llava",
        str(llava),
        "--num-workers",
        "0",
        "--test-list",
        str(listing),
        "--audio-dir",
        str(world / "audio"),
    ]
    test += ["--align-dir", str(run / "align"), "--prefix-dir", str(run / "prefix"), "--no-evaluate"]
    test += ["--strategy", "greedy", "--max-new-tokens", "16", "--distill-dir", str(tmp_path / "distill")]
    assert infer.main([*test, "--projector", "distilled", "--no-use-prefix", "--out", str(tmp_path / "student")]) == 0
    assert infer.main([*test, "--projector", "original", "--use-prefix", "--out", str(tmp_path / "undistilled")]) == 0
    reference = {r["id"]: r["caption"] for r in records}

    def closeness(folder):
        predictions = read_jsonl(folder / "predictions.jsonl")
        return sum(_token_f1(p["caption"], reference[p["id"]]) for p in predictions) / len(predictions)

    assert closeness(tmp_path / "student") > closeness(tmp_path / "undistilled")
    losses = [r["loss"] for r in read_jsonl(tmp_path / "distill" / "metrics.jsonl")]
    assert sum(losses[-8:]) / 8 < 0.8 * sum(losses[:8]) / 8  # and it learned: the loss fell


def _true_caption(scene: dict) -> str:
    from dali.synthetic.world import SOURCES

    events = sorted(scene["events"], key=lambda event: event["start"])
    return ", then ".join(SOURCES[event["source"]].actions[0] for event in events)


def _pseudo_captions(pipeline, tmp_path):
    world, llava, run = pipeline
    flags = ["--llava", str(llava), "--num-workers", "0", "--batch-size", "8", "--clips", str(world / "pseudo.json")]
    flags += ["--align-dir", str(run / "align"), "--prefix-dir", str(run / "prefix"), "--max-new-tokens", "16"]
    assert pseudo_label.main([*flags, "--out", str(tmp_path / "pseudo")]) == 0
    return tmp_path / "pseudo"


def _distill_flags(pipeline, pseudo, out):
    world, llava, run = pipeline
    return [
        "--llava",
        str(llava),
        "--align-dir",
        str(run / "align"),
        "--pseudo-dir",
        str(pseudo),
        "--num-workers",
        "0",
        "--batch-size",
        "8",
        "--cache-audio-tokens",
        "--lr",
        "1e-3",
        "--out",
        str(out),
    ]


def test_image_modality_needs_frames(pipeline):
    from dali.flags import ConfigError

    world, llava, run = pipeline
    with pytest.raises(ConfigError, match="--frames-dir"):
        infer.main(["--llava", str(llava), "--test-list", str(world / "test.csv"), "--modality", "image"])


@pytest.mark.slow
def test_two_processes_follow_the_single_process_loss_curve(synthetic, tmp_path):
    """torchrun with 2 CPU processes (gloo) and half the batch each: the same losses as one process."""
    world, llava = synthetic
    env = dict(os.environ, DALI_PROGRESS="0", PYTHONPATH=str(ROOT))
    losses = {}
    for processes in (1, 2):
        out = tmp_path / f"p{processes}"
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(processes),
            "-m",
            "dali.cli",
            "prefix-tune",
            *prefix_flags(world, llava, 4),
            "--batch-size",
            str(16 // processes),
            "--device",
            "cpu",
            "--out",
            str(out),
        ]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        losses[processes] = [r["loss"] for r in read_jsonl(out / "metrics.jsonl")]
    assert len(losses[1]) == len(losses[2]) == 4
    assert max(abs(a - b) for a, b in zip(losses[1], losses[2])) < 1e-4


def test_cached_image_tokens_travel_with_the_batch(write_wav):
    from dali.data import Clip, ClipDataset, collate

    clips = [Clip(f"c{i}", write_wav(f"c{i}.wav", seconds=0.5)) for i in range(3)]
    dataset = ClipDataset(clips, need_audio=True, need_image=False, target_frames=64)
    dataset.image_tokens = torch.arange(3 * 4 * 2, dtype=torch.float16).view(3, 4, 2)
    batch = collate([dataset[i] for i in (2, 0)])
    assert batch["image_tokens"].dtype == torch.float16
    assert torch.equal(batch["image_tokens"], dataset.image_tokens[[2, 0]])
    assert batch["features"].shape == (2, 64, 128)


def test_sharded_captioning_merges_every_ranks_captions_in_input_order(write_wav, tmp_path):
    """Two ranks (run one after the other here) caption their strided shares; rank 0 merges in input order."""
    from dali.clip_captioning import CaptionJob, caption_clips, split_skipped
    from dali.data import Clip, ClipDataset
    from dali.distributed import Context

    clips = [Clip(f"c{i}", write_wav(f"c{i}.wav", seconds=0.5)) for i in range(7)]
    clips[3] = Clip("c3", tmp_path / "missing.wav")  # a corrupt clip is reported, not captioned

    class EchoCaptioner:  # names each row after the features it got, so a caption can only come from its own clip
        def generate(self, block, options):
            return [f"{row.sum().item():.3f}" for row in block]

    def dataset_for(chunk):
        return ClipDataset(chunk, need_audio=True, need_image=False, target_frames=32)

    def run(rank: int):
        job = CaptionJob(
            EchoCaptioner(),
            lambda batch: batch["features"],
            DecodingOptions(),
            tmp_path,
            Context(rank=rank, world_size=2),
            batch_size=2,
            num_workers=0,
        )
        return caption_clips(job, clips, dataset_for)

    assert list(run(1)) == []  # a rank other than 0 writes its part and returns nothing
    captions, skipped = split_skipped(run(0))
    assert [record["id"] for record in captions] == ["c0", "c1", "c2", "c4", "c5", "c6"]
    assert [record["id"] for record in skipped] == ["c3"]
    expected = dataset_for(clips)
    for record in captions:
        index = int(record["id"][1:])
        assert record["caption"] == f"{expected[index]['features'].sum().item():.3f}"


def test_every_process_takes_its_share_of_one_shuffle():
    """Shuffle, then shard (prefix tuning used to shard, then shuffle: its processes drew from different orders)."""
    from dali.distributed import Context
    from dali.training import epoch_order, epoch_share

    items = [f"clip{i}" for i in range(11)]
    shuffled = [items[i] for i in epoch_order(len(items), 3, 2)]
    assert epoch_share(items, 3, 2, Context()) == shuffled
    shares = [epoch_share(items, 3, 2, Context(rank=r, world_size=2)) for r in (0, 1)]
    assert shares == [shuffled[0::2], shuffled[1::2]]
    assert epoch_share(items, 3, 3, Context()) != shuffled  # a new order each epoch


def _gather_in_process(rank: int, store: str, out: str) -> None:
    import torch.distributed as dist

    from dali.distributed import gather_records

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    gathered = gather_records([{"id": f"bad{rank}", "rank": rank}])
    Path(out, f"rank{rank}.json").write_text(json.dumps(gathered))
    dist.destroy_process_group()


def test_bad_clips_of_every_process_reach_the_skipped_list(tmp_path):
    """Under torchrun, align and distill listed only rank 0's unreadable clips; gather_records brings them all."""
    import torch.multiprocessing as mp

    from dali.distributed import gather_records

    assert gather_records([{"id": "a"}]) == [{"id": "a"}]  # one process: its own records
    mp.spawn(_gather_in_process, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        gathered = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert [record["id"] for record in gathered] == ["bad0", "bad1"]


def test_the_web_pages_captioner_turns_bad_input_into_messages_and_deletes_nothing(pipeline, tmp_path, write_wav):
    from helpers import write_mp4

    from dali.audio_captioner import AudioCaptioner
    from dali.command_configs import AppConfig
    from dali.tools.app import ClipCaptioner

    run = pipeline[2]
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    config = AppConfig(run=str(run), max_seconds=15.0)
    page = ClipCaptioner(AudioCaptioner.from_run(run), config, outputs)
    long_clip = write_wav("long.wav", seconds=30.0)
    result = page(str(long_clip), "audio", "greedy", 0)
    assert [row[:2] for row in result.rows] == [[0.0, 10.24], [10.24, 15.0]]
    assert "only its first 15 s" in result.message and result.spectrogram.size[0] > 0 and not result.frames
    assert "0.20 s long" in page(str(write_wav("short.wav", seconds=0.2)), "audio", "greedy", 0).message
    silent = write_mp4(tmp_path / "silent.mp4", seconds=2.0, sound=False)
    assert "no audio stream" in page(str(silent), "audio", "greedy", 0).message
    (tmp_path / "empty.wav").write_bytes(b"")
    assert "Could not caption empty.wav" in page(str(tmp_path / "empty.wav"), "audio", "greedy", 0).message
    assert "no video stream" in page(str(long_clip), "audio + image (videos)", "greedy", 0).message
    assert "Upload" in page(None, "audio", "greedy", 0).message
    page_file = tmp_path / "page.html"
    page_file.write_text("<script>alert(1)</script>")  # the record slot takes any upload: the type is checked here
    assert "not an audio or video file" in page(str(page_file), "audio", "greedy", 0).message
    sampled = page(str(long_clip), "audio", "seeded sampling", 3)
    assert len(sampled.rows) == 2 and long_clip.exists() and page_file.exists()  # a request deletes nothing
    assert Path(sampled.json_path).is_relative_to(outputs)
    assert json.loads(Path(sampled.json_path).read_text())["decoding"]["strategy"] == "sample"


def _launch(flags: list[str], command: str, preset: str, nodes: int = 1) -> list[subprocess.Popen]:
    """The stage through scripts/run_stage.sh: one process, or ``nodes`` "machines" meeting at a localhost
    rendezvous (torchrun's c10d, gloo), each started as docs/cluster.md says."""
    port = free_port()
    base = dict(os.environ, DALI_PROGRESS="0", PYTHON=sys.executable, PYTHONPATH=str(ROOT))
    script = [str(ROOT / "scripts" / "run_stage.sh"), command, preset, *flags]
    if nodes == 1:
        return [subprocess.Popen(script, env=base, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    cluster = {"NNODES": str(nodes), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NPROC": "1"}
    return [
        subprocess.Popen(
            script,
            env=base | cluster | {"NODE_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(nodes)
    ]


def _finish(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-3000:]


@pytest.mark.slow
def test_two_nodes_at_a_rendezvous_train_and_caption_as_one_process(pipeline, tmp_path):
    """Two "nodes" (torchrun --nnodes 2 at a c10d rendezvous on localhost, gloo) give the loss curve of one process
    (half the batch each) and, pseudo-labelling, the same captions merged in input order."""
    world, llava, run = pipeline
    on_cpu = ["--device", "cpu", "--dtype", "float32"]
    prefix = [*prefix_flags(world, llava, 3), *on_cpu]
    captions = ["--llava", str(llava), *on_cpu, "--clips", str(world / "pseudo.json"), "--limit", "6"]
    captions += ["--align-dir", str(run / "align")]
    captions += ["--prefix-dir", str(run / "prefix"), "--batch-size", "2", "--num-workers", "0", "--strategy", "greedy"]
    losses, merged = {}, {}
    for nodes in (1, 2):
        out = tmp_path / f"nodes{nodes}"
        batch = ["--batch-size", str(16 // nodes)]
        _finish(_launch([*prefix, *batch, "--out", str(out / "prefix")], "prefix-tune", "prefix_tuning", nodes))
        losses[nodes] = [record["loss"] for record in read_jsonl(out / "prefix" / "metrics.jsonl")]
        _finish(_launch([*captions, "--out", str(out / "pseudo")], "pseudo-label", "pseudo_labels", nodes))
        merged[nodes] = [(r["id"], r["caption"]) for r in read_jsonl(out / "pseudo" / "pseudo_captions.jsonl")]
    assert len(losses[1]) == len(losses[2]) == 3
    assert max(abs(a - b) for a, b in zip(losses[1], losses[2])) < 1e-4
    assert len(merged[1]) == 6 and merged[1] == merged[2]
