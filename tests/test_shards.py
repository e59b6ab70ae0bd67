"""WebDataset shards: `dali prepare --shards` from media files or a prepared list, the index, resuming a killed
sharding, and reading samples back exactly as the loose files read (bad samples and truncated tars named)."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from helpers import write_mp4
from hypothesis import given
from hypothesis import strategies as st

from dali.data import ClipError, load_clip_audio, load_frame, read_cavmae_json
from dali.files import file_sha256
from dali.flags import ConfigError
from dali.jsonl import read_jsonl
from dali.shards import SampleProblem, ShardError, read_samples, read_shard_index
from dali.tools import prepare


def _pack(world, out, *flags, clips="pseudo.json"):
    assert prepare.main([str(world / clips), str(out), "--shards", "--workers", "2", *flags]) == 0
    return read_shard_index(out / "shards.json")


def _samples(index):
    return [sample for number in range(len(index.shards)) for sample in read_samples(index.url(number))]


def test_a_prepared_list_packs_into_indexed_shards_that_read_as_the_loose_files(synthetic, tmp_path):
    world, _ = synthetic
    clips = read_cavmae_json(world / "pseudo.json")
    index = _pack(world, tmp_path / "shards", "--shard-mb", "1", "--shard-frames", "5", "2")
    assert len(index.shards) > 2 and index.samples == len(clips) and index.frames == (5, 2)
    for shard in index.shards:
        path = tmp_path / "shards" / shard.name
        assert file_sha256(path) == shard.sha256 and path.stat().st_size == shard.bytes
    samples = _samples(index)
    assert [s.id for s in samples] == list(clips.ids)
    assert [s.key for s in samples] == [f"{n:09d}" for n in range(len(clips))]
    for clip, sample in list(zip(clips, samples))[::7]:
        assert torch.equal(load_clip_audio(clip), load_clip_audio(sample))  # the wav's samples, exactly
        for k in (5, 2):
            assert np.array_equal(np.asarray(load_frame(clip, k)), np.asarray(load_frame(sample, k)))
    with pytest.raises(ClipError, match="holds no frame 3"):
        load_frame(samples[0], 3)


def test_a_killed_sharding_resumes_after_its_last_finished_shard(synthetic, tmp_path):
    world, _ = synthetic
    whole = _pack(world, tmp_path / "whole", "--shard-mb", "1")
    out = tmp_path / "killed"
    _pack(world, out, "--shard-mb", "1")
    progress = out / "shards.progress.jsonl"
    lines = progress.read_text().splitlines(keepends=True)
    progress.write_text("".join(lines[:2]) + lines[2][:30])  # killed while writing the third shard's line
    (out / "shards.json").unlink()
    for name in sorted(p.name for p in out.glob("shard-*.tar"))[2:]:
        (out / name).unlink()
    (out / ".shard-000002.tar.x1y2.tmp").write_bytes(b"half a shard")  # what the kill left of the third
    resumed = _pack(world, out, "--shard-mb", "1")
    assert [vars(s) for s in resumed.shards] == [vars(s) for s in whole.shards]  # same bytes, same hashes
    assert not list(out.glob(".*.tmp"))


def test_media_files_shard_with_their_failures_reported(tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    write_mp4(media / "moving.mp4", seconds=2.0)
    (media / "broken.mp4").write_bytes(b"not a video")
    out = tmp_path / "out"
    assert prepare.main([str(media), str(out), "--shards", "--workers", "1"]) == 0
    index = read_shard_index(out / "shards.json")
    (sample,) = _samples(index)
    assert prepare.main([str(media), str(tmp_path / "loose"), "--workers", "1"]) == 0
    (loose,) = read_cavmae_json(tmp_path / "loose" / "clips.json")
    assert sample.id == loose.id == "moving" and torch.equal(load_clip_audio(sample), load_clip_audio(loose))
    assert np.array_equal(np.asarray(load_frame(sample, 9)), np.asarray(load_frame(loose, 9)))
    report = {r.get("id", r.get("shard")): r for r in read_jsonl(out / "prepare_report.jsonl")}
    assert report["broken"]["status"] == "failed" and report["shard-000000.tar"]["samples"] == 1


def test_shard_flags_need_shards_and_a_bad_index_is_named(tmp_path):
    with pytest.raises(ConfigError, match="need --shards"):
        prepare.main([str(tmp_path), str(tmp_path / "out"), "--shard-mb", "5"])
    with pytest.raises(ConfigError, match="shard-frames"):
        prepare.main([str(tmp_path), str(tmp_path / "out"), "--shards", "--shard-frames", "10"])
    index = tmp_path / "shards.json"
    for data, message in [
        ({"format": "dali-shards", "version": 1, "shards": []}, "1-100000 shards"),
        ({"format": "dali-shards", "version": 1, "shards": [{"name": "a.tar", "samples": -1}]}, "shard 0 needs"),
        ({"format": "dali-shards", "version": 2, "shards": []}, "version 2"),
        ({"format": "other"}, "not a shard index"),
    ]:
        index.write_text(json.dumps(data))
        with pytest.raises(ShardError, match=message) as error:
            read_shard_index(index)
        assert str(index) in str(error.value)


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_bad_samples_and_truncated_shards_are_named_by_key(tmp_path, write_wav):
    flac = io.BytesIO()
    import soundfile

    soundfile.write(flac, np.zeros(1600, np.float32), 16_000, format="FLAC")
    record = lambda clip_id: json.dumps({"id": clip_id}).encode()  # noqa: E731
    members = [("000000000.flac", flac.getvalue()), ("000000000.json", record("good"))]
    members += [("000000001.flac", b"not flac"), ("000000001.json", record("corrupt"))]
    members += [("000000002.flac", flac.getvalue()), ("000000002.json", b"[1, 2")]
    members += [("000000003.flac", flac.getvalue()), ("000000003.json", record("late"))]
    shard = _tar(tmp_path / "s.tar", members)
    good, corrupt, no_record, late = read_samples(str(shard))
    assert len(load_clip_audio(good)) == 1600
    with pytest.raises(ClipError, match="unreadable") as error:
        load_clip_audio(corrupt)
    assert error.value.path == f"{shard}#000000001"
    assert isinstance(no_record, SampleProblem) and no_record.key == "000000002"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) * 3 // 4])  # cut inside the last sample
    *_, end = read_samples(str(shard))
    assert isinstance(end, SampleProblem) and end.key is None and "ends early" in end.reason


# -- stages reading shards --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def quick_run(synthetic, tmp_path_factory):
    """An unaligned tiny encoder and a prefix to caption with (made in-process, quickly): (world, flags)."""
    from helpers import prefix_flags, tiny_encoder_flags

    from dali.stages import align, prefix_tune

    world, llava = synthetic
    folder = tmp_path_factory.mktemp("quick_run")
    align_flags = [*tiny_encoder_flags(world, llava), "--epochs", "0", "--num-workers", "0"]
    assert align.main([*align_flags, "--out", str(folder / "align")]) == 0
    assert prefix_tune.main([*prefix_flags(world, llava, 1), "--out", str(folder / "prefix")]) == 0
    flags = ["--llava", str(llava), "--align-dir", str(folder / "align"), "--prefix-dir", str(folder / "prefix")]
    # sampled: equal captions then need equal batches and seeds, not only equal inputs
    flags += ["--batch-size", "4", "--max-new-tokens", "8", "--temperature", "1.0", "--num-beams", "1"]
    return world, flags


def _pseudo_label(flags, clips, out, *more):
    from dali.stages import pseudo_label

    assert pseudo_label.main([*flags, "--clips", str(clips), "--out", str(out), *more]) == 0
    return read_jsonl(out / "pseudo_captions.jsonl"), read_jsonl(out / "skipped.jsonl")


def test_pseudo_labelling_captions_shards_as_it_captions_the_list(quick_run, tmp_path):
    world, flags = quick_run
    index = _pack(world, tmp_path / "shards", "--shard-samples", "8")  # a multiple of --batch-size
    listed, _ = _pseudo_label(flags, world / "pseudo.json", tmp_path / "list", "--limit", "30", "--num-workers", "0")
    sharded, skipped = _pseudo_label(flags, index.path, tmp_path / "sharded", "--limit", "30", "--num-workers", "2")
    assert [(r["id"], r["caption"]) for r in sharded] == [(r["id"], r["caption"]) for r in listed] and not skipped
    assert sharded[9]["shard"] == index.url(1) and sharded[9]["key"] == "000000009"
    assert not list((tmp_path / "sharded").glob("piece-*"))  # merged, then removed


def test_corrupt_samples_and_truncated_shards_are_skipped_by_shard_and_key(quick_run, tmp_path):
    world, flags = quick_run
    index = _pack(world, tmp_path / "shards", "--shard-samples", "6", "--shard-frames", "5")
    first, second = (tmp_path / "shards" / shard.name for shard in index.shards[:2])
    data = bytearray(first.read_bytes())
    flac = data.find(b"fLaC", data.find(b"000000002.flac"))
    data[flac : flac + 64] = bytes(64)  # sample 2's audio, corrupt
    first.write_bytes(bytes(data))
    second.write_bytes(second.read_bytes()[: second.stat().st_size // 2])  # cut inside its samples
    captions, skipped = _pseudo_label(flags, index.path, tmp_path / "out", "--limit", "12", "--num-workers", "0")
    by_key = {record["key"]: record for record in skipped}
    assert by_key["000000002"]["shard"] == str(first) and "unreadable" in by_key["000000002"]["reason"]
    lost = [record for record in skipped if record["key"] is None]
    assert lost and all(r["shard"] == str(second) and "ends early" in r["reason"] for r in lost)
    assert len(captions) + len(skipped) == 12 and {r["key"] for r in captions}.isdisjoint(by_key)
    with pytest.raises(ClipError, match="000000002"):
        _pseudo_label(flags, index.path, tmp_path / "stop", "--limit", "12", "--num-workers", "0", "--on-error", "stop")
    with pytest.raises(ConfigError, match="hold frames \\[5\\]"):
        _pseudo_label(flags, index.path, tmp_path / "frame3", "--frame-index", "3")
    with pytest.raises(ConfigError, match="--shuffle"):
        _pseudo_label(flags, index.path, tmp_path / "shuffled", "--shuffle")


@given(sizes=st.lists(st.integers(0, 40), min_size=1, max_size=12), world_size=st.integers(1, 9))
def test_ranks_split_a_set_into_equal_contiguous_pieces_whatever_the_shard_count(tmp_path_factory, sizes, world_size):
    from dali.shard_reading import rank_pieces
    from dali.shards import Shard, ShardIndex

    index = ShardIndex(
        tmp_path_factory.getbasetemp() / "shards.json", [Shard(f"{n}", k, 0, "") for n, k in enumerate(sizes)]
    )
    shares = [rank_pieces(index, rank, world_size) for rank in range(world_size)]
    positions = [[piece.position(i) for piece in share for i in range(piece.size)] for share in shares]
    assert sum(positions, []) == list(range(sum(sizes)))  # every sample once, in order
    assert max(map(len, positions)) - min(map(len, positions)) <= 1
    assert all(0 <= p.start < p.stop <= sizes[p.shard] for share in shares for p in share)


def test_inference_captions_shards_as_it_captions_the_test_list(quick_run, tmp_path):
    from dali.data import Clip, write_cavmae_json
    from dali.stages import infer

    world, flags = quick_run
    ids = [f"test{n:05d}" for n in range(12)]
    clips = [Clip(i, audio=world / "audio" / f"{i}.wav", frames_root=world / "frames") for i in ids]
    write_cavmae_json(clips, tmp_path / "test.json")
    prepare.main([str(tmp_path / "test.json"), str(tmp_path / "shards"), "--shards", "--shard-samples", "4"])
    common = [*flags, "--modality", "audio_vis", "--projector", "llava", "--use-prefix", "--limit", "12"]
    csv = [
        "--test-list",
        str(world / "test.csv"),
        "--frames-dir",
        str(world / "frames"),
        "--audio-dir",
        str(world / "audio"),
    ]
    assert infer.main([*common, *csv, "--num-workers", "0", "--out", str(tmp_path / "csv")]) == 0
    sharded = ["--test-list", str(tmp_path / "shards" / "shards.json"), "--num-workers", "2"]
    assert infer.main([*common, *sharded, "--out", str(tmp_path / "sharded")]) == 0
    listed, read = (read_jsonl(tmp_path / name / "predictions.jsonl") for name in ("csv", "sharded"))
    assert [(r["id"], r["caption"]) for r in read] == [(r["id"], r["caption"]) for r in listed]
    assert [r["id"] for r in read] == ids and (tmp_path / "csv" / "scores.json").exists()
    frame5 = tmp_path / "frame5"  # a set holding frame 5 only: from audio alone, --frame-index is not asked of it
    prepare.main([str(tmp_path / "test.json"), str(frame5), "--shards", "--shard-frames", "5"])
    audio_only = [*flags, "--projector", "llava", "--use-prefix", "--limit", "4", "--num-workers", "0"]
    audio_only += ["--test-list", str(frame5 / "shards.json"), "--frame-index", "3"]
    assert infer.main([*audio_only, "--modality", "audio", "--out", str(tmp_path / "audio")]) == 0
    with pytest.raises(ConfigError, match="hold frames \\[5\\]"):
        infer.main([*audio_only, "--modality", "audio_vis", "--out", str(tmp_path / "audio_vis")])


@pytest.mark.slow
def test_killed_sharded_pseudo_labelling_resumes_to_each_sample_captioned_once(quick_run, tmp_path):
    import random

    from helpers import cli_lines, run_cli

    world, flags = quick_run
    index = _pack(world, tmp_path / "shards", "--shard-samples", "8", "--shard-frames", "5", clips="align.json")
    base = ["pseudo-label", *flags, "--clips", str(index.path), "--num-workers", "2"]
    run_cli([*base, "--out", str(tmp_path / "whole")])
    killed = tmp_path / "killed"
    threshold = random.Random().randint(1, index.samples - 8)  # a random point: any piece, any batch
    written = lambda: sum(cli_lines(part) for part in killed.glob("piece-*.jsonl"))  # noqa: E731
    assert run_cli([*base, "--out", str(killed)], kill_when=lambda: written() >= threshold) is None
    assert not (killed / "manifest.json").exists()
    run_cli([*base, "--out", str(killed), "--resume"])
    whole, resumed = (read_jsonl(folder / "pseudo_captions.jsonl") for folder in (tmp_path / "whole", killed))
    keys = [f"{n:09d}" for n in range(index.samples)]  # the index's samples, each once
    assert [r["key"] for r in resumed] == keys and resumed == whole, f"killed after {threshold} records"


def _tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_alignment_and_distillation_train_from_shards_as_from_the_lists(quick_run, synthetic, tmp_path):
    """The training stages take samples in any order: each is read where it starts in its shard."""
    from helpers import tiny_encoder_flags

    from dali.stages import align, distill

    world, flags = quick_run
    _, llava = synthetic
    shards = _pack(world, tmp_path / "align_shards", "--shard-samples", "10", clips="align.json")
    base = [*tiny_encoder_flags(world, llava), "--epochs", "1", "--batch-size", "8", "--num-workers", "2"]
    assert align.main([*base, "--out", str(tmp_path / "align_list")]) == 0
    swapped = [str(shards.path) if arg == str(world / "align.json") else arg for arg in base]
    assert align.main([*swapped, "--out", str(tmp_path / "align_shards_run")]) == 0
    listed, sharded = (
        _tensors(tmp_path / name / "audio_encoder.safetensors") for name in ("align_list", "align_shards_run")
    )
    assert listed.keys() == sharded.keys() and all(torch.equal(listed[k], sharded[k]) for k in listed)

    index = _pack(world, tmp_path / "pseudo_shards", "--shard-samples", "4")
    _pseudo_label(flags, world / "pseudo.json", tmp_path / "pseudo_list", "--num-workers", "0")
    _pseudo_label(flags, index.path, tmp_path / "pseudo_shards_run", "--num-workers", "0")
    align_dir = flags[flags.index("--align-dir") + 1]
    common = [
        "--llava",
        str(llava),
        "--align-dir",
        align_dir,
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--num-workers",
        "2",
    ]
    for name in ("list", "shards_run"):
        assert (
            distill.main(
                [*common, "--pseudo-dir", str(tmp_path / f"pseudo_{name}"), "--out", str(tmp_path / f"d_{name}")]
            )
            == 0
        )
    listed, sharded = (_tensors(tmp_path / f"d_{name}" / "projector.safetensors") for name in ("list", "shards_run"))
    assert all(torch.equal(listed[k], sharded[k]) for k in listed)
    assert not read_jsonl(tmp_path / "d_shards_run" / "skipped.jsonl")


def test_a_member_declaring_any_size_costs_what_it_holds(tmp_path):
    """A tar header may declare 100 GB for a few bytes: the sample is refused by its declared size, never read."""
    header = tarfile.TarInfo("000000000.flac")
    header.size = 100 << 30
    record = tarfile.TarInfo("000000000.json")
    body = json.dumps({"id": "huge"}).encode()
    record.size = len(body)
    shard = tmp_path / "s.tar"
    shard.write_bytes(header.tobuf() + b"x" * 512 + record.tobuf() + body.ljust(512, b"\0") + bytes(1024))
    declared, end = read_samples(str(shard))
    assert declared.key == "000000000" and "declares 107374182400 bytes, over" in declared.reason
    assert end.key is None and "ends early" in end.reason


def test_shards_read_through_a_url_webdataset_opens(quick_run, tmp_path, monkeypatch):
    """--shard-base names where the stages read the shards: here a 'pipe:' command, as for an object store. An
    index's commands run only when the environment allows them."""
    from dali.shard_reading import ShardedClips, read_clip_source

    world, flags = quick_run
    folder = tmp_path / "shards"
    with pytest.raises(ShardError, match="DALI_SHARD_COMMANDS=1"):
        _pack(world, folder, "--shard-samples", "8", "--shard-base", f"pipe:touch {tmp_path / 'ran'}; cat {folder}")
    with pytest.raises(ShardError, match="through shell commands"):
        _pseudo_label(flags, folder / "shards.json", tmp_path / "refused", "--limit", "4")
    assert not (tmp_path / "ran").exists()
    monkeypatch.setenv("DALI_SHARD_COMMANDS", "1")
    index = _pack(world, folder, "--shard-samples", "8", "--shard-base", f"pipe:cat {folder}")
    assert index.url(0) == f"pipe:cat {folder}/shard-000000.tar"
    piped, _ = _pseudo_label(flags, index.path, tmp_path / "piped", "--limit", "12", "--num-workers", "0")
    listed, _ = _pseudo_label(flags, world / "pseudo.json", tmp_path / "list", "--limit", "12", "--num-workers", "0")
    assert [(r["id"], r["caption"]) for r in piped] == [(r["id"], r["caption"]) for r in listed]
    with pytest.raises(ShardError, match="only from a file"):  # the training stages seek: they need files
        load_clip_audio(ShardedClips(index)[3])
    with pytest.raises(ConfigError, match="is a stream"):
        read_clip_source(index.path, None, 5)
