"""An AudioSet-scale clip list: memory and time to the first batch of `dali pseudo-label` with 2,000,000 clips.

    python benchmarks/clip_lists.py                      # after `make demo` (its run captions the list)
    python benchmarks/clip_lists.py --clips 200000 --run expe/demo

A CAV-MAE list of N entries is written (ids of AudioSet's shape; the first 256 are the demo world's pseudo-caption
clips, the rest name files that do not exist and are skipped as such). Then, each in a fresh process:
- rank 0's merge of 4 part files of as many captions, streamed to pseudo_captions.jsonl, against holding them all
  and sorting them (the merge before);
- reading the list: its time and the process's peak memory over a bare interpreter's, for the compact reader
  (`dali.data.read_cavmae_json`) and, for reference, for `json.load` and a list of `Clip` (the reader before);
- `dali pseudo-label` on the list as users run it: seconds from the command's start to the first batch written
  to its part file, and the command's peak memory; then the same command killed and run again with
  `--resume`: seconds to its next batch.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import report  # noqa: E402

READERS = {
    "compact": "from dali.data import read_cavmae_json; clips = read_cavmae_json(PATH); n = len(clips)",
    "json.load + list[Clip]": (
        "import json; from pathlib import Path; from dali.data import Clip; root = Path(PATH).parent;"
        "clips = [Clip(str(r['video_id']), root / r['wav'], root / r['video_path'])"
        " for r in json.loads(Path(PATH).read_text())['data']]; n = len(clips)"
    ),
}
PEAK = "import resource; peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024"


def write_list(world: Path, count: int, path: Path) -> None:
    """``count`` entries: the world's pseudo-caption clips first (real files), then AudioSet-shaped ids."""
    real = json.loads((world / "pseudo.json").read_text())["data"][:256]
    with open(path, "w") as stream:
        stream.write('{"data": [')
        for i in range(count):
            if i < len(real):
                paths = {"wav": str(world / real[i]["wav"]), "video_path": str(world / real[i]["video_path"])}
                record = real[i] | paths
            else:
                clip_id = f"{i:011x}_{(i * 7919) % 300_000:d}"
                record = {"video_id": clip_id, "wav": f"/data/audioset/wav/{clip_id}.wav"}
                record |= {"video_path": "/data/audioset/frames", "labels": "/m/09x0r,/m/04rlf"}
            stream.write(("," if i else "") + json.dumps(record))
        stream.write("]}")


def reading(path: Path) -> dict:
    result = {}
    for name, code in READERS.items():
        script = (
            f"{PEAK}; import time; base = peak(); import dali.data, torch; base = peak(); PATH = {str(path)!r};"
            f"start = time.perf_counter(); {code}; seconds = time.perf_counter() - start;"
            "print(n, seconds, peak() - base)"
        )
        n, seconds, megabytes = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, check=True
        ).stdout.split()
        result[name] = {"clips": int(n), "seconds": round(float(seconds), 2), "peak_mb_over_imports": float(megabytes)}
    return result


MERGE = """
import json, resource, sys, time
from pathlib import Path
from dali.jsonl import read_jsonl
from dali.clip_captioning import merged_records, part_file, write_captions
out, ranks, how = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
base, start = peak(), time.perf_counter()
if how == "stream":
    count = write_captions(merged_records(out, ranks), out / "pseudo_captions.jsonl", [])
else:  # every record held, then sorted: the merge before
    count = len(sorted((r for k in range(ranks) for r in read_jsonl(part_file(out, k))), key=lambda r: r["position"]))
print(count, time.perf_counter() - start, peak() - base)
"""


def merging(folder: Path, count: int, ranks: int = 4) -> dict:
    """Rank 0's merge of ``ranks`` part files holding ``count`` captions, streamed (now) or held (before)."""
    from dali.clip_captioning import part_file

    for rank in range(ranks):
        with open(part_file(folder, rank), "w") as stream:
            for i in range(rank, count, ranks):
                clip_id = f"{i:011x}_30000"
                record = {"id": clip_id, "caption": "a dog barks and a car passes by in the distance"}
                record |= {"audio": f"/data/audioset/wav/{clip_id}.wav", "image": f"/data/frames/{clip_id}.jpg"}
                stream.write(json.dumps(record | {"position": i}) + "\n")
    result = {}
    for how in ("stream", "held"):
        command = [sys.executable, "-c", MERGE, str(folder), str(ranks), how]
        merged, seconds, megabytes = subprocess.run(command, capture_output=True, text=True, check=True).stdout.split()
        result[how] = {"captions": int(merged), "seconds": round(float(seconds), 1), "peak_mb": round(float(megabytes))}
    return result


def first_batch(command: list[str], part: Path) -> tuple[float, float, subprocess.Popen]:
    """Seconds from the command's start to the first new line in ``part``, and its peak memory (MB) by then."""
    lines = part.read_bytes().count(b"\n") if part.exists() else 0
    start = time.perf_counter()
    log = tempfile.TemporaryFile("w+")  # the stage's messages, shown if it stops
    process = subprocess.Popen(command, stdout=log, stderr=log, text=True, start_new_session=True)
    while (part.read_bytes().count(b"\n") if part.exists() else 0) <= lines:
        if process.poll() is not None:
            log.seek(0)
            raise SystemExit(f"the stage stopped before its first batch: {' '.join(command)}\n{log.read()[-3000:]}")
        time.sleep(0.05)
    seconds = time.perf_counter() - start
    status = Path(f"/proc/{process.pid}/status").read_text()
    peak = next(int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmHWM"))
    return seconds, peak, process


def _kill(process: subprocess.Popen) -> None:
    """SIGKILL to the stage and its loader workers, as a node's failure would."""
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def stage(path: Path, llava: Path, run: Path, out: Path, batch: int) -> dict:
    command = [sys.executable, "-m", "dali.cli", "pseudo-label", "--clips", str(path), "--out", str(out)]
    command += ["--llava", str(llava), "--align-dir", str(run / "ot_att" / "align")]
    command += ["--prefix-dir", str(run / "prefix"), "--batch-size", str(batch), "--num-workers", "2"]
    seconds, peak, process = first_batch(command, out / "part-000.jsonl")
    _kill(process)
    resumed, _, process = first_batch(command + ["--resume"], out / "part-000.jsonl")
    _kill(process)
    return {"first_batch_s": round(seconds, 1), "peak_rss_mb": round(peak), "resumed_first_batch_s": round(resumed, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=2_000_000)
    parser.add_argument("--world", type=Path, default=Path("data/synthetic"))
    parser.add_argument("--run", type=Path, default=Path("expe/demo"))
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "list.json"
        write_list(args.world.resolve(), args.clips, path)
        result = {"clips": args.clips, "list_mb": round(path.stat().st_size / 2**20)}
        result["reading"] = reading(path)
        (Path(folder) / "merge").mkdir()
        result["merging_4_parts"] = merging(Path(folder) / "merge", args.clips)
        llava = args.world / "captioner_model"
        small = _small(path, Path(folder))
        result["stage_256_clips"] = stage(small, llava, args.run, Path(folder) / "small", args.batch_size)
        result["stage"] = stage(path, llava, args.run, Path(folder) / "out", args.batch_size)
    report("clip_lists", result)


def _small(path: Path, folder: Path) -> Path:
    """The same list cut to its first 256 entries: the stage's memory without the list."""
    from dali.data import read_cavmae_json, write_cavmae_json

    small = folder / "small.json"
    write_cavmae_json(read_cavmae_json(path)[:256], small)
    return small


if __name__ == "__main__":
    main()
