"""The captioning stages as users run them, fed from files on disk, against the engine fed from memory.

    python benchmarks/stage_throughput.py --work /tmp/stage_bench --gpus 4

At LLaVA-1.5-7B shapes with random weights (written to disk once, in Hugging Face format), on `--clips` 10 s wavs
and 336 px JPEG frames written to disk:
1. `dali prefix-tune` (1 epoch) and `dali align` (0 epochs: CAV-MAE ViT-B shapes) make the run folders;
2. on GPU 0, `scripts/run_stage.sh pseudo_label` ([image, audio, prefix] -> 20 new tokens, greedy, bf16); on
   GPU 1 at the same time, `scripts/run_stage.sh infer` (audio + prefix, LLaVA's projector); on GPU 2 the same
   two tasks from memory: the same model, encoder and prefix through `Captioner.generate`, with inputs already
   on the GPU;
3. `NPROC=N scripts/run_stage.sh pseudo_label` on N GPUs.

A stage's clips/s is measured from its part files while every process captions: from the moment the last one has
written its first batch (models loaded, engine compiled) to the moment the first one has written its last. Where
its time goes comes from the stage's metrics.jsonl: the seconds each batch waited for the loader, captioned, and
wrote. ``--phases multi`` alone takes its 1-GPU figures from an earlier ``--phases single`` in the same work folder
on the same kind of device, if there is one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import soundfile
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import benchmark_tokenizer, device_name, llava_7b_config, random_llava, report, sync  # noqa: E402

from dali.jsonl import read_jsonl  # noqa: E402
from dali.runs import METRICS  # noqa: E402

NEW_TOKENS = 20
DECODING = ["--strategy", "greedy", "--max-new-tokens", str(NEW_TOKENS), "--dtype", "bfloat16"]


SINGLE_RESULT = "single_gpu_result.json"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: only to try the benchmark itself, with --text-layers 1


def write_inputs(work: Path, clips: int, single_clips: int, text_layers: int) -> None:
    """Random LLaVA-1.5-7B weights, ``clips`` wavs and frames (those of an earlier run here kept), CAV-MAE lists and
    test CSVs of all of them and of the first ``single_clips`` (the 1-GPU phase), and 16 prefix pairs."""
    from dali.models.tiny_llava import save_tiny_llava

    if not (work / "llava" / "config.json").exists():
        torch.manual_seed(0)
        model = random_llava(llava_7b_config(text_layers=text_layers), device=DEVICE)
        save_tiny_llava(model, benchmark_tokenizer(), work / "llava")
        del model
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    (work / "audio").mkdir(parents=True, exist_ok=True)
    (work / "frames" / "frame_5").mkdir(parents=True, exist_ok=True)
    ids = [f"clip{i:06d}" for i in range(clips)]
    with ProcessPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
        list(pool.map(partial(write_clips, work, ids), range(0, clips, 256)))
    records = [{"video_id": i, "wav": f"audio/{i}.wav", "video_path": "frames", "labels": ""} for i in ids]
    for name, count in (("", clips), ("_single", single_clips)):
        (work / f"list{name}.json").write_text(json.dumps({"data": records[:count]}))
        (work / f"test{name}.csv").write_text("youtube_id,caption\n" + "".join(f"{i},a sound\n" for i in ids[:count]))
    (work / "pairs_list.json").write_text(json.dumps({"data": records[:16]}))
    (work / "pairs.csv").write_text("image,caption\n" + "".join(f"frames/frame_5/{i}.jpg,a sound\n" for i in ids[:16]))


def write_clips(work: Path, ids: list[str], start: int) -> None:
    """A 10 s wav and a frame for each of ``ids[start:start + 256]``, unless there (seeded by ``start``)."""
    rng = np.random.default_rng(start)
    pixels = rng.integers(0, 255, (8, 336, 336, 3), dtype=np.uint8)
    for i, clip_id in enumerate(ids[start : start + 256]):
        wave = (0.1 * rng.standard_normal(160_000)).astype(np.float32)
        frame = work / "frames" / "frame_5" / f"{clip_id}.jpg"
        if not frame.exists():  # (written after its wav)
            soundfile.write(work / "audio" / f"{clip_id}.wav", wave, 16_000, subtype="PCM_16")
            Image.fromarray(pixels[i % 8]).save(frame, quality=90)


def launch(module: str, preset: str, flags: list[str], gpus: str, nproc: int = 1) -> subprocess.Popen:
    """A stage through scripts/run_stage.sh with the paper's preset, as users run it (its output in a log)."""
    env = {"CUDA_VISIBLE_DEVICES": gpus, "PYTHON": sys.executable} | ({"NPROC": str(nproc)} if nproc > 1 else {})
    return _logged(["bash", str(ROOT / "scripts" / "run_stage.sh"), module, preset, *flags], env, flags)


def setup_stage(command: str, flags: list[str], gpu: str) -> subprocess.Popen:
    """A stage that only makes the run folders (no preset: a random encoder, not the paper's checkpoint)."""
    return _logged([sys.executable, "-m", "dali.cli", command, *flags], {"CUDA_VISIBLE_DEVICES": gpu}, flags)


def _logged(command: list[str], env: dict, flags: list[str]) -> subprocess.Popen:
    out = Path(flags[flags.index("--out") + 1])
    log = open(out.parent / f"{out.name}.log", "w")
    return subprocess.Popen(command, env=os.environ | env | {"DALI_PROGRESS": "0"}, stdout=log, stderr=log)


class Watch(threading.Thread):
    """Clips/s of a running stage from its part files, sampled as they grow.

    The rate is taken while every process captions: from the moment the last one has written its first batch
    (models loaded, engine compiled) to the moment the first one has written its last. The stagger of the
    processes' first batches, and the rate over the whole run (first batch of any to last of all), come beside it.
    """

    def __init__(self, process: subprocess.Popen, out: Path, nproc: int = 1):
        super().__init__(daemon=True)
        self.process, self.out, self.nproc = process, out, nproc
        self.start()

    def run(self) -> None:
        parts = [self.out / f"part-{rank:03d}.jsonl" for rank in range(self.nproc)]
        self.samples = [(time.perf_counter(), [0] * self.nproc)]  # (time, lines per part) at each change
        while self.process.poll() is None:
            now = time.perf_counter()
            counts = [p.read_bytes().count(b"\n") if p.exists() else 0 for p in parts]
            if sum(counts) > sum(self.samples[-1][1]):  # (the parts are removed once merged)
                self.samples.append((now, counts))
            time.sleep(0.02)

    def _rates(self) -> dict:
        samples = self.samples[1:]
        first = [next(t for t, c in samples if c[r]) for r in range(self.nproc)]
        last = [next(t for t, c in samples if c[r] == samples[-1][1][r]) for r in range(self.nproc)]
        begin, end = max(first), min(last)
        if end <= begin:
            raise SystemExit(f"{self.out.name}: no moment when every process was captioning: give it more clips")
        at = lambda moment: sum(next(c for t, c in reversed(samples) if t <= moment))  # noqa: E731
        measured = at(end) - at(begin)
        whole = sum(samples[-1][1]) - sum(samples[0][1])
        return {
            "clips_per_s": round(measured / (end - begin), 2),
            "clips_measured": measured,
            "first_batch_stagger_s": round(begin - min(first), 1),
            "clips_per_s_first_to_last_batch": round(whole / (max(last) - min(first)), 2),
        }

    def result(self) -> dict:
        self.join()
        if self.process.returncode or len(self.samples) < 3:
            raise SystemExit(f"{self.out.name}: the stage failed ({self.process.returncode}) or ran too few batches")
        records = read_jsonl(self.out / METRICS)
        batches = [r for r in records if "loader_wait_s" in r][1:]  # past the first (compiling) batch
        keys = ("loader_wait_s", "caption_s", "write_s")
        where = {k: round(statistics.fmean(r[k] for r in batches), 3) for k in keys}
        return self._rates() | {"per_batch_rank0": where}


def engine_from_memory(work: Path, batch: int, with_image: bool, repeats: int = 4) -> float:
    """Clips/s of the same captioning with its inputs already on the GPU (the engine's ceiling for the stage)."""
    from dali.captioning import CaptioningModels
    from dali.models.decoding import DecodingOptions
    from dali.run import Run
    from dali.stage_table import ALIGN, PREFIX

    run = Run(work)  # its align/ and prefix/ folders
    models = CaptioningModels.load(run, (ALIGN, PREFIX), llava=str(work / "llava"), dtype="bfloat16", device=DEVICE)
    fbank = torch.randn(batch, 1024, 128, device=DEVICE)
    pixels = torch.randn(batch, 3, 336, 336, device=DEVICE) if with_image else None
    options = DecodingOptions(strategy="greedy", max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    times = []
    for _ in range(repeats + 1):  # the first call compiles
        sync()
        start = time.perf_counter()
        with torch.no_grad():
            models.captioner.generate(models.block(fbank, pixels), options)
        sync()
        times.append(time.perf_counter() - start)
    models.captioner.release_decoder()
    del models
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return round(batch / min(times[1:]), 2)


def engine_elsewhere(work: Path, args, gpu: str) -> dict:
    """:func:`engine_from_memory` for both tasks, in a process of its own on ``gpu``."""
    flags = ["--work", str(work), "--pseudo-batch", str(args.pseudo_batch), "--infer-batch", str(args.infer_batch)]
    env = os.environ | {"CUDA_VISIBLE_DEVICES": gpu}
    output = subprocess.run(
        [sys.executable, __file__, "--engine-only", *flags], env=env, check=True, text=True, stdout=subprocess.PIPE
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


def make_run_folders(work: Path, llava: list[str], gpus: int) -> None:
    """A prefix (1 epoch) and an encoder (0 epochs) at the real shapes, unless made by an earlier run here."""
    if (work / "prefix" / "manifest.json").exists() and (work / "align" / "manifest.json").exists():
        return
    prefix_flags = ["--pairs", str(work / "pairs.csv"), "--epochs", "1", "--batch-size", "4", "--dtype", "bfloat16"]
    prefix = setup_stage("prefix-tune", [*llava, *prefix_flags, "--out", str(work / "prefix"), "--overwrite"], "0")
    align_flags = ["--train-list", str(work / "pairs_list.json"), "--epochs", "0", "--out", str(work / "align")]
    align = setup_stage("align", [*llava, *align_flags, "--overwrite"], "1" if gpus > 1 else "0")
    if prefix.wait() or align.wait():
        raise SystemExit("prefix tuning or alignment failed (see their logs in the work folder)")


def single_gpu(work: Path, args, pseudo: list[str], infer: list[str]) -> dict:
    """Each stage on a GPU of its own (0 and 1) and the engine from memory on a third, at the same time, on the
    first ``--single-clips``; the result is also kept in the work folder for a later ``--phases multi``."""
    second = "1" if args.gpus > 1 else "0"
    pseudo, infer = _single(pseudo, work / "list.json"), _single(infer, work / "test.csv")
    one = Watch(
        launch("pseudo_label", "pseudo_labels", [*pseudo, "--out", str(work / "pl1"), "--overwrite"], "0"), work / "pl1"
    )
    two = Watch(
        launch("infer", "inference", [*infer, "--out", str(work / "infer1"), "--overwrite"], second), work / "infer1"
    )
    result = {"engine_from_memory": engine_elsewhere(work, args, "2" if args.gpus > 2 else "0")}
    result["stage_1_gpu"] = {"pseudo_label": one.result(), "infer": two.result()}
    for name in ("pseudo_label", "infer"):
        stage, engine = result["stage_1_gpu"][name]["clips_per_s"], result["engine_from_memory"][name]
        result["stage_1_gpu"][name]["fraction_of_engine"] = round(stage / engine, 3)
    print(json.dumps(result), flush=True)
    (work / SINGLE_RESULT).write_text(json.dumps(result | {"device": device_name()}))
    return result


def _single(flags: list[str], listed: Path) -> list[str]:
    return [str(listed.with_stem(listed.stem + "_single")) if f == str(listed) else f for f in flags]


def earlier_single(work: Path) -> dict:
    """The 1-GPU phase of an earlier run in this work folder, on this kind of device (else nothing)."""
    path = work / SINGLE_RESULT
    earlier = json.loads(path.read_text()) if path.exists() else {}
    return earlier if earlier.get("device") == device_name() else {}


def several_gpus(work: Path, gpus: int, pseudo: list[str]) -> dict:
    visible = ",".join(map(str, range(gpus)))
    flags = [*pseudo, "--out", str(work / "pln"), "--overwrite"]
    return {
        "pseudo_label": Watch(
            launch("pseudo_label", "pseudo_labels", flags, visible, gpus), work / "pln", gpus
        ).result()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/stage_bench"))
    parser.add_argument("--clips", type=int, default=3072)
    parser.add_argument("--single-clips", type=int, help="the 1-GPU phase on the first N clips (default: all)")
    parser.add_argument("--gpus", type=int, default=1, help="N > 1: pseudo-labelling on N GPUs too")
    parser.add_argument("--phases", default="single,multi", help="single (1 GPU, and the engine), multi, or both")
    parser.add_argument("--pseudo-batch", type=int, default=64, help="[image, audio, prefix]: 64 fits an 80 GB card")
    parser.add_argument("--infer-batch", type=int, default=128)
    parser.add_argument("--text-layers", type=int, default=32, help="32: LLaVA-1.5-7B")
    parser.add_argument("--engine-only", action="store_true", help="(internal) print the engine's figures")
    args = parser.parse_args()
    work = args.work.resolve()
    if args.engine_only:
        engine = {"pseudo_label": engine_from_memory(work, args.pseudo_batch, with_image=True)}
        engine["infer"] = engine_from_memory(work, args.infer_batch, with_image=False)
        print(json.dumps(engine))
        return
    args.single_clips = min(args.single_clips or args.clips, args.clips)
    write_inputs(work, args.clips, args.single_clips, args.text_layers)
    llava = ["--llava", str(work / "llava")]
    make_run_folders(work, llava, args.gpus)
    run = ["--align-dir", str(work / "align"), "--prefix-dir", str(work / "prefix"), *DECODING]
    pseudo = [*llava, *run, "--clips", str(work / "list.json"), "--batch-size", str(args.pseudo_batch)]
    infer = [*run, "--test-list", str(work / "test.csv"), "--audio-dir", str(work / "audio"), "--modality", "audio"]
    infer += ["--projector", "original", "--use-prefix", "--no-evaluate", "--batch-size", str(args.infer_batch)]
    result = {"clips": args.clips, "new_tokens": NEW_TOKENS, "cpu_cores": os.cpu_count()}
    if "single" in args.phases:
        result |= {"single_clips": args.single_clips} | single_gpu(work, args, pseudo, infer)
    elif "multi" in args.phases:
        result |= {"stage_1_gpu_from_earlier_run": earlier_single(work)}
        result["stage_1_gpu"] = result["stage_1_gpu_from_earlier_run"].get("stage_1_gpu")
    if "multi" in args.phases and args.gpus > 1:
        result[f"stage_{args.gpus}_gpus"] = several_gpus(work, args.gpus, pseudo)
        if result.get("stage_1_gpu"):
            scaled, single = (
                r["pseudo_label"]["clips_per_s"] for r in (result[f"stage_{args.gpus}_gpus"], result["stage_1_gpu"])
            )
            result[f"stage_{args.gpus}_gpus"]["speedup"] = round(scaled / single, 2)
    report("stage_throughput", result)
    print(f"device: {device_name()}")


if __name__ == "__main__":
    main()
