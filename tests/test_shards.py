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

from dali.data import ClipError, load_clip_audio, load_frame, read_cavmae_json
from dali.files import file_sha256
from dali.flags import ConfigError
from dali.jsonl import read_jsonl
from dali.shards import SampleProblem, ShardError, read_samples, read_shard_index
from dali.tools import prepare


def _pack(world, out, *flags):
    assert prepare.main([str(world / "pseudo.json"), str(out), "--shards", "--workers", "2", *flags]) == 0
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
    resumed = _pack(world, out, "--shard-mb", "1")
    assert [vars(s) for s in resumed.shards] == [vars(s) for s in whole.shards]  # same bytes, same hashes


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
