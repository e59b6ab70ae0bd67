"""The compact clip list: the same clips as the JSON says, in the same orders, for a fraction of the memory."""

from __future__ import annotations

import json
import random
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from dali.clip_list import PackedStrings
from dali.data import Clip, read_cavmae_json
from dali.distributed import Context, shard


@settings(max_examples=50, deadline=None)
@given(st.lists(st.text(max_size=30)))
def test_packed_strings_give_back_every_string(values):
    packed = PackedStrings(values)
    assert list(packed) == values and len(packed) == len(values)


def test_a_name_that_is_not_utf8_round_trips():
    name = b"clip-\xff.wav".decode("utf-8", "surrogateescape")
    assert PackedStrings([name])[0] == name


def _write_list(path: Path, records: list[dict]) -> Path:
    path.write_text(json.dumps({"labels_info": {"a": [1, {"b": None}]}, "data": records}))
    return path


def test_the_list_reads_as_the_json_says_and_shards_and_shuffles_as_a_list(tmp_path):
    records = [
        {"video_id": f"v{i}", "wav": f"wav/v{i}.wav", "video_path": "frames" if i % 3 else "", "labels": "/m/1"}
        for i in range(23)
    ]
    records.append({"video_id": 7, "wav": "/abs/seven.wav", "video_path": "/abs/frames"})  # a number id, absolute
    records.append({"video_id": "v4", "wav": "dup.wav"})  # a duplicate id is dropped, as before
    clips = read_cavmae_json(_write_list(tmp_path / "list.json", records))
    expected = [
        Clip(
            str(r["video_id"]),
            tmp_path / r["wav"] if not r["wav"].startswith("/") else Path(r["wav"]),
            (tmp_path / r["video_path"] if not r["video_path"].startswith("/") else Path(r["video_path"]))
            if r.get("video_path")
            else None,
            labels=r.get("labels"),  # kept: a set packed into shards carries them
        )
        for r in records[:-1]
    ]
    assert list(clips) == expected and len(clips) == 24
    assert list(clips.ids) == [clip.id for clip in expected]
    shuffled = list(expected)
    random.Random(5).shuffle(shuffled)
    assert list(clips.shuffled(5)) == shuffled  # the order the stages drew before the list was packed
    for rank in range(3):
        share = shard(clips.shuffled(5)[:20], Context(rank=rank, world_size=3))
        assert list(share) == shuffled[:20][rank::3]
        assert list(share.ids) == [clip.id for clip in shuffled[:20][rank::3]]
    assert clips[-1] == expected[-1] and list(clips[::-1]) == expected[::-1]
