"""A simulated AudioSet in WebDataset shards on this machine: the stages' reading costs at the set's count.

    python benchmarks/shards.py                         # 200,000 samples of 1 s in shards of 2,000
    python benchmarks/shards.py --samples 2000000 --folder /scratch/shards

Each sample is what `dali prepare --shards` writes (1 s of 16 kHz flac, one 224 x 224 JPEG frame, its record); the
clip count is AudioSet's order, the clips are short. The first two shards' clips are also written as loose files
(wav + JPEG + a CAV-MAE list). Each figure comes from a fresh process:
- the index: seconds to read it and the memory a process holding it has over one with dali imported (resident,
  after), for this set and for an index of AudioSet's 2,000,000 clips in 1 GB shards (1,000 entries);
- time to the first batch of a stage's reader (index read, this rank's pieces, the first shard opened, one batch
  of fbank features and frame pixels), for rank 0 of 1 and of 32;
- read rate per CPU core (one process, no loader workers), on the same clips: samples/s read as bytes (two shards'
  clips: in order, and in a random order as the training stages read them, each where it starts), and read and
  turned into batches of the stages' inputs (the first 512: fbank + pixels), from the shards and from loose files;
- after a kill half-way through pseudo-labelling (every piece's file written up to a random batch): the resumed
  run's bookkeeping (each piece's file checked, the batches left found), then the final merge of every piece into
  pseudo_captions.jsonl; seconds and memory.
Memory is resident memory over the imports'. The page cache is warm for every reader (the files were just
written), as on a node that reads a set twice.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import report  # noqa: E402

# resident memory now (the peak would keep the imports' transient high-water mark)
RSS = "rss = lambda: next(int(l.split()[1]) / 1024 for l in open('/proc/self/status') if l.startswith('VmRSS'))"
BATCH = 64


def write_set(folder: Path, samples: int, per_shard: int) -> Path:
    """``samples`` samples in shards of ``per_shard``, and their index; returns the index's path."""
    from PIL import Image

    from dali.audio import flac_bytes
    from dali.shards import INDEX_FILE, ShardIndex, ShardSample, write_shard

    rng = np.random.default_rng(0)
    audio = [flac_bytes(rng.uniform(-0.3, 0.3, 16_000).astype(np.float32)) for _ in range(8)]
    frames = []
    for k in range(8):
        buffer = io.BytesIO()
        pixels = (rng.random((224, 224, 3)) * 64 + k * 24).astype(np.uint8)
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
        frames.append(buffer.getvalue())

    def stream():
        for i in range(samples):
            record = {"id": f"{i:011x}_30000", "source": f"/data/audioset/{i:011x}_30000.mp4", "seconds": 1.0}
            yield ShardSample(record | {"labels": "/m/09x0r,/m/04rlf"}, audio[i % 8], {5: frames[i % 8]})

    shards, samples_in = [], stream()
    while shard := write_shard(
        folder / f"s{len(shards):06d}.tar", samples_in, len(shards) * per_shard, 1 << 40, per_shard
    ):
        shards.append(shard)
    index = ShardIndex(folder / INDEX_FILE, shards, (5,))
    (folder / INDEX_FILE).write_text(json.dumps(index.as_json()))
    return folder / INDEX_FILE


def write_loose(index_path: Path, folder: Path, shards: int) -> Path:
    """The first ``shards`` shards' clips as loose files and a CAV-MAE list of them."""
    from dali.data import Clip, write_cavmae_json
    from dali.shards import read_samples, read_shard_index

    index = read_shard_index(index_path)
    clips = []
    for number in range(shards):
        for sample in read_samples(index.url(number)):
            (folder / "audio").mkdir(parents=True, exist_ok=True)
            (folder / "frames" / "frame_5").mkdir(parents=True, exist_ok=True)
            wave, rate = soundfile.read(io.BytesIO(sample.media["flac"]), dtype="int16")
            soundfile.write(folder / "audio" / f"{sample.id}.wav", wave, rate, subtype="PCM_16")
            (folder / "frames" / "frame_5" / f"{sample.id}.jpg").write_bytes(sample.media["frame_5.jpg"])
            clips.append(Clip(sample.id, folder / "audio" / f"{sample.id}.wav", folder / "frames"))
    write_cavmae_json(clips, folder / "list.json")
    return folder / "list.json"


def audioset_index(path: Path, samples: int = 2_000_000, shards: int = 1_000) -> Path:
    """An index (only) of AudioSet's size: ``shards`` entries of ``samples / shards`` samples."""
    from dali.shards import Shard, ShardIndex

    entries = [Shard(f"shard-{k:06d}.tar", samples // shards, 1 << 30, f"{k:064x}") for k in range(shards)]
    path.write_text(json.dumps(ShardIndex(path, entries, (5,)).as_json()))
    return path


def measured(code: str, **values) -> dict:
    """Run ``code`` in a fresh interpreter (dali imported first); it sets ``result`` (a dict), printed back."""
    setup = "".join(f"{name} = {value!r}\n" for name, value in values.items())
    script = f"{RSS}\nimport json, time\nimport dali.data, dali.shard_reading, torch\nbase = rss()\n{setup}{code}\n"
    script += "result['rss_mb_over_imports'] = round(rss() - base, 1)\nprint(json.dumps(result))"
    output = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    if output.returncode:
        raise SystemExit(output.stderr[-3000:])
    return json.loads(output.stdout.splitlines()[-1])


INDEX = """
start = time.perf_counter()
from dali.shards import read_shard_index
index = read_shard_index(PATH)
result = {"shards": len(index.shards), "samples": index.samples, "seconds": round(time.perf_counter() - start, 3)}
"""

READER = """
from dali.data import ClipDataset
from dali.shard_reading import PieceBatches, rank_pieces
from dali.shards import read_shard_index
from dali.clip_captioning import _piece_done
start = time.perf_counter()
index = read_shard_index(PATH)
pieces = rank_pieces(index, 0, RANKS)
dataset = ClipDataset([], need_audio=True, need_image=True, image_transform=PIXELS)
batch = next(iter(PieceBatches(index, [(piece, 0) for piece in pieces], BATCH, dataset)))
result = {"pieces": len(pieces), "first_batch_s": round(time.perf_counter() - start, 3)}
"""

RATE = """
from dali.data import ClipDataset, collate, read_cavmae_json
from dali.shard_reading import PieceBatches, Piece
from dali.shards import read_samples, read_shard_index
index = read_shard_index(PATH)
dataset = ClipDataset(read_cavmae_json(LIST), need_audio=True, need_image=True, image_transform=PIXELS)
count = len(dataset)
result = {"samples": count}
start = time.perf_counter()
if WHAT == "shards, bytes":
    n = sum(1 for k in range(SHARDS) for _ in read_samples(index.url(k)))
elif WHAT == "shards in any order, bytes":  # the training stages' reads: each sample where it starts
    from dali.data import read_shard_clip
    from dali.shard_reading import ShardedClips
    import random
    clips = ShardedClips(index)[: index.offsets[SHARDS]]
    order = list(range(len(clips)))
    random.Random(0).shuffle(order)
    n = sum(read_shard_clip(clips[i]).media is not None for i in order)
elif WHAT == "loose, bytes":
    n = sum(len(c.audio.read_bytes()) + len(c.frame_path(5).read_bytes()) > 0 for c in dataset.clips)
elif WHAT == "shards, decoded":
    count = result["samples"] = DECODED
    n = sum(len(b["id"]) for b in PieceBatches(index, [(Piece(0, 0, count, 0), 0)], BATCH, dataset))
else:
    count = result["samples"] = DECODED
    n = sum(len(collate([dataset[i] for i in range(s, min(s + BATCH, count))])["id"]) for s in range(0, count, BATCH))
assert n == count, (n, count)
result["samples_per_s"] = round(count / (time.perf_counter() - start))
"""

RESUME = """
from dali.clip_captioning import _piece_done, merged_pieces, write_captions
from dali.shard_reading import rank_pieces
from dali.shards import read_shard_index
from pathlib import Path
out = Path(OUT)
index = read_shard_index(PATH)
start = time.perf_counter()
pieces = rank_pieces(index, 0, 1)
done = [_piece_done(out / piece.name, piece) for piece in pieces]
result = {"pieces": len(pieces), "samples_done": sum(done)}
result["resume_bookkeeping_s"] = round(time.perf_counter() - start, 2)
if MERGE:
    start = time.perf_counter()
    result["merged"] = write_captions(merged_pieces(out, index, 1), out / "pseudo_captions.jsonl", [])
    result["merge_s"] = round(time.perf_counter() - start, 2)
"""


READS = ("shards, bytes", "shards in any order, bytes", "loose, bytes", "shards, decoded", "loose, decoded")


def killed_half_way(index_path: Path, out: Path, whole: bool) -> None:
    """Every piece's file as a kill leaves them (each written up to a random batch), or whole."""
    from dali.shard_reading import rank_pieces
    from dali.shards import read_shard_index

    index, chance = read_shard_index(index_path), random.Random(0)
    out.mkdir(exist_ok=True)
    for piece in rank_pieces(index, 0, 1):
        done = piece.size if whole else min(chance.randrange(0, piece.size // BATCH + 1) * BATCH, piece.size)
        with open(out / piece.name, "w") as stream:
            for i in range(done):
                record = {"id": f"{piece.position(i):011x}_30000", "caption": "a dog barks and a car passes by"}
                record |= {"shard": f"/data/shards/shard-{piece.shard:06d}.tar", "key": f"{piece.position(i):09d}"}
                stream.write(json.dumps(record | {"position": piece.position(i)}) + "\n")


PIXELS = (
    "lambda images: torch.stack([torch.from_numpy(np.asarray(i.resize((336, 336)), dtype=np.float32)) for i in images])"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=200_000)
    parser.add_argument("--per-shard", type=int, default=2_000)
    parser.add_argument("--folder", type=Path, default=None, help="where to write the set (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.folder) as folder:
        folder = Path(folder)
        start = time.perf_counter()
        index = write_set(folder / "shards", args.samples, args.per_shard)
        written = time.perf_counter() - start
        listed = write_loose(index, folder / "loose", 2)
        gigabytes = sum(p.stat().st_size for p in (folder / "shards").glob("*.tar")) / 2**30
        result = {"samples": args.samples, "per_shard": args.per_shard, "shards_gb": round(gigabytes, 2)}
        result["write_s"] = round(written, 1)
        result["index"] = measured(INDEX, PATH=str(index))
        result["index_2m_clips"] = measured(INDEX, PATH=str(audioset_index(folder / "audioset.json")))
        pixels = PIXELS.replace("np.", "__import__('numpy').")
        common = {"PATH": str(index), "BATCH": BATCH}
        result["first_batch"] = {
            f"rank 0 of {ranks}": measured(READER.replace("PIXELS", pixels), RANKS=ranks, **common) for ranks in (1, 32)
        }
        result["read_rate_one_core"] = {
            what: measured(RATE.replace("PIXELS", pixels), WHAT=what, LIST=str(listed), SHARDS=2, DECODED=512, **common)
            for what in READS
        }
        killed_half_way(index, folder / "killed", whole=False)
        result["after_a_kill"] = measured(RESUME, OUT=str(folder / "killed"), MERGE=False, PATH=str(index))
        killed_half_way(index, folder / "whole", whole=True)
        result["finished"] = measured(RESUME, OUT=str(folder / "whole"), MERGE=True, PATH=str(index))
    report("shards", result)


if __name__ == "__main__":
    main()
