"""``make demo``: the whole method on the built-in synthetic world (its flags: ``command_configs.DemoConfig``)."""

from __future__ import annotations

import functools
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from dali import command_configs
from dali.command_configs import DemoConfig
from dali.cpu_kernels import kernel_facts, pin_torch
from dali.evaluation import TABLE_METRICS, markdown_table
from dali.files import atomic_write_json, atomic_write_text
from dali.flags import config_to_dict, parse_config
from dali.jsonl import read_jsonl
from dali.logs import log, setup_logging
from dali.runs import MANIFEST, check_run_name, finished_differs, read_manifest
from dali.stage_table import ALIGN, DISTILL, PREFIX, PSEUDO_LABEL, STAGES, infer_folder
from dali.stages import align, distill, infer, prefix_tune, pseudo_label
from dali.synthetic.build import build_encoder, build_world
from dali.synthetic.captioner import MARKER as CAPTIONER_MARKER
from dali.synthetic.encoder_pretraining import MARKER as PRETRAINING_MARKER
from dali.synthetic.world import source_scores

PRESETS = Path(__file__).resolve().parent.parent.parent / "configs" / "synthetic"
PAPER_NAMES = {
    "image_captioner": "Image captioner on images (*)",
    "unaligned": "Unaligned encoder",
    "mmd": "DALI-MMD",
    "ot": "DALI-OT",
    "ot_att": "DALI-OT-Att",
}


@dataclass(frozen=True)
class Row:
    variant: str
    distilled: bool
    modality: str
    encoder: str = "cav-mae"  # the audio encoder's family (--audio-encoder)

    @property
    def name(self) -> str:
        label = PAPER_NAMES[self.variant] + (f" [{self.encoder.upper()}]" if self.encoder != "cav-mae" else "")
        if self.modality == "audio_vis":
            label += " (audio + image)"
        return label + (" + distillation" if self.distilled else "")

    @property
    def group(self) -> str:
        """The run's folder of this row's encoder (one per variant and encoder family)."""
        return self.variant + (f"-{self.encoder}" if self.encoder != "cav-mae" else "")

    @property
    def folder(self) -> str:
        return infer_folder(self.modality, "distilled" if self.distilled else None)


MADE_BY = "made_by.json"  # the captioner and encoder start the run's stages are made with, and since when
DEFAULT_ROWS = (
    Row("image_captioner", False, "image"),
    Row("unaligned", False, "audio"),
    Row("ot_att", False, "audio"),
    Row("ot_att", True, "audio"),
    Row("ot_att", False, "audio_vis"),
)
ENCODER_ROWS = (("unaligned", False), ("ot_att", False), ("ot_att", True))  # (variant, distilled) of another encoder
SEEDS_ROWS = DEFAULT_ROWS + (Row("mmd", False, "audio"), Row("ot", False, "audio"))
FULL_ROWS = (
    Row("image_captioner", False, "image"),
    Row("unaligned", False, "audio"),
    Row("unaligned", True, "audio"),
    Row("mmd", False, "audio"),
    Row("mmd", True, "audio"),
    Row("ot", False, "audio"),
    Row("ot", True, "audio"),
    Row("ot_att", False, "audio"),
    Row("ot_att", True, "audio"),
    Row("ot_att", False, "audio_vis"),
)


def _older_than(folder: Path, since: float) -> bool:
    """Whether nothing in ``folder`` was written at or after ``since`` (a time from ``time.time()``)."""
    return all(path.stat().st_mtime < since for path in folder.rglob("*") if path.is_file())


def run_stage(module, folder: Path, argv: list[str], overwrite: bool = False, since: float = 0.0) -> Path:
    """Run a stage unless its folder is finished; an interrupted one resumes. With ``overwrite``, when the folder
    holds only files written before ``since`` (made with another captioner), or, in a run the demo made (``since``
    set), when it was finished with other settings or inputs than ``argv`` gives now (a preset changed, an upstream
    stage redone), it is redone."""
    overwrite = overwrite or (folder.exists() and _older_than(folder, since))
    if (folder / MANIFEST).exists() and not overwrite:
        reason = _made_otherwise(module, folder, argv) if since else None
        if reason is None:
            log.info("reusing finished stage %s", folder)
            return folder
        log.warning("%s is redone: %s", folder, reason)
        overwrite = True
    flags = ["--out", str(folder)] + (["--overwrite"] if overwrite else ["--resume"] if folder.exists() else [])
    code = module.main(argv + flags)
    if code:
        raise RuntimeError(f"stage {module.__name__} failed with code {code}")
    return folder


def _made_otherwise(module, folder: Path, argv: list[str]) -> str | None:
    """Why the finished stage in ``folder`` is not what ``module`` makes from ``argv`` now, or None."""
    row = next(row for row in STAGES if row.module == module.__name__)
    config = config_to_dict(parse_config(getattr(command_configs, row.config), [*argv, "--out", str(folder)]))
    return finished_differs(folder, config)


def main(argv: list[str] | None = None) -> int:
    args = parse_config(DemoConfig, argv)
    setup_logging()
    pin_torch()  # with the environment the `dali` entry pinned: the same kernels on every Intel host of our kind
    started = time.time()
    check_run_name(args.run)
    rows = FULL_ROWS if args.full else SEEDS_ROWS if args.seeds > 1 else DEFAULT_ROWS
    if args.audio_encoder != "cav-mae":  # its rows beside CAV-MAE's: unaligned, aligned, and distilled
        rows += tuple(Row(v, d, "audio", args.audio_encoder) for v, d in ENCODER_ROWS)
    runs = []
    for seed in range(args.seeds):
        suffix = f"_seed{seed}" if seed else ""
        run = Path(args.expe_dir) / (args.run + suffix)
        results = run_demo(args, Path(args.world + suffix), run, rows, seed)
        runs.append(results)
        table = results_table(results["rows"]) + "\n" + claims_text(results["claims"])
        print(f"\n{run}: seed {seed}\n{table}" + time_text(results["seconds"]) + kernels_text(results["kernels"]))
    if args.seeds > 1:
        summary = summarise_seeds(runs)
        folder = Path(args.expe_dir) / args.run
        atomic_write_json(folder / "seeds.json", summary)
        text = seeds_markdown(summary)
        atomic_write_text(folder / "seeds.md", text)
        print("\n" + text)
    log.info("demo finished in %.0f s", time.time() - started)
    return 0


def run_demo(args, world: Path, run: Path, rows: tuple[Row, ...], seed: int) -> dict:
    """World, captioner and every stage of one seed; writes and returns ``<run>/results.json``."""
    seconds: dict[str, float] = {}  # where this call's time went (a part reused from an earlier call: about 0)
    world_args = (world, args.reduced, args.captioner_epochs, seed, args.captioner_lr)
    llava = _timed(seconds, "world and image captioner", build_world, *world_args)
    pretrained = args.encoder_start == "pretrained"
    encoder = _timed(seconds, "encoder pretraining", build_encoder, world, args.reduced, seed) if pretrained else None
    common = ["--llava", str(llava), "--seed", str(seed)]
    made = functools.partial(run_stage, overwrite=args.overwrite, since=_made_since(run, llava, encoder))

    def stage(module, folder: Path, argv: list[str]) -> Path:
        return _timed(seconds, folder.relative_to(run).as_posix(), made, module, folder, argv)

    short = ["--epochs", "20"] if args.reduced else []
    pairs = ["--pairs", str(world / "prefix_pairs.json")]
    prefix_dir = stage(prefix_tune, run / PREFIX.folder, [*preset("prefix_tuning"), *common, *pairs, *short])
    scenes = {scene["id"]: scene for scene in json.loads((world / "scenes.json").read_text())["test"]}
    paper_first = sorted({(row.encoder != "cav-mae", row.group) for row in rows if row.variant != "image_captioner"})
    groups = [group for _, group in paper_first]
    results = []
    for group in ["image_captioner", *groups]:
        folder, group_rows = run / group, [r for r in rows if r.group == group]
        if group != "image_captioner":
            train_variant(stage, world, folder, group_rows, common, prefix_dir, args.reduced, encoder)
        for row in group_rows:
            out = stage(infer, folder / row.folder, infer_flags(world, folder, row, common, prefix_dir))
            results.append(row_result(row, out, scenes))
    claims = check_claims([{row["name"]: row for row in results}])
    report = {"rows": results, "claims": claims, "encoder_start": args.encoder_start, "kernels": kernel_facts()}
    report["seconds"] = seconds
    atomic_write_json(run / "results.json", report)
    atomic_write_text(
        run / "results.md",
        "# Synthetic world: audio captioning on audio-only test clips\n\n"
        + results_table(results)
        + "\n(*) sees the test clip's frame, not its audio. heard_source_precision / recall: the share of the "
        "sources a caption names that were heard in the clip, and of the heard sources that it names.\n\n"
        + claims_text(report["claims"])
        + "\n"
        + kernels_text(report["kernels"]),
    )
    plot_results(results, run / "results.png")
    return report


def _timed(seconds: dict[str, float], name: str, make, *args):
    """``make(*args)``, its wall time in ``seconds[name]``."""
    started = time.monotonic()
    made = make(*args)
    seconds[name] = round(time.monotonic() - started, 1)
    return made


def time_text(seconds: dict[str, float]) -> str:
    parts = ", ".join(f"{name} {value:.0f} s" for name, value in seconds.items())
    return f"Time: {sum(seconds.values()):.0f} s ({parts})\n"


def kernels_text(facts: dict) -> str:
    """Which kernels made the table, on which processor, and which hosts print the same one."""
    processor = facts["processor"].get("model name") or facts["processor"]["machine"]
    mkl = facts["mkl_cbwr"] or "own dispatch"
    onednn = "on" if facts["mkldnn"] else "off"
    settings = f"ATen {facts['aten']}, MKL {mkl}, oneDNN {onednn}, {facts['threads']} threads"
    return f"Kernels: {settings}, on {processor}; the same table on {facts['same_table_on']}\n"


def _made_since(run: Path, llava: Path, encoder: Path | None) -> float:
    """Since when the run's stages have been made with this captioner and this start of the audio encoder (their
    keys name the world and the training; a random start has none).

    A run the demo made with another captioner or start starts now: its older stages are redone, one by one, so an
    interrupted redo resumes where it stopped and never reuses a stage of the old ones. A run the demo did not
    make (no ``made_by.json``) is never redone without ``--overwrite``: its finished stages are kept.
    """
    key = json.loads((llava / CAPTIONER_MARKER).read_text())["key"]
    start = json.loads((encoder.parent / PRETRAINING_MARKER).read_text())["key"] if encoder else "random"
    if (run / MADE_BY).exists():
        made_by = json.loads((run / MADE_BY).read_text())
        if made_by["captioner"] == key and made_by.get("encoder") == start:
            return made_by["since"]
        log.warning("%s was made with another world, image captioner or encoder start: its stages are redone", run)
    elif run.is_dir() and any(run.iterdir()):
        log.warning(
            "%s was not made by the demo (it has no %s): its finished stages are kept as they are, the others "
            "made; pass --overwrite to redo them all",
            run,
            MADE_BY,
        )
        return 0.0
    since = time.time()
    atomic_write_json(run / MADE_BY, {"captioner": key, "encoder": start, "since": since})
    return since


def preset(name: str) -> list[str]:
    return ["--config", str(PRESETS / f"{name}.yaml")]


def train_variant(stage, world: Path, folder: Path, rows: list[Row], common, prefix_dir, reduced, start) -> None:
    """Stage 1b for one variant and encoder (the rows of one group), from the pretrained CAV-MAE-shaped encoder
    ``start`` (random weights when None, and for another family), then pseudo-captions and distillation when a
    distilled row needs them."""
    stage(align, folder / ALIGN.folder, align_flags(world, rows[0], common, reduced, start))
    if not any(row.distilled for row in rows):
        return
    upstream = ["--align-dir", str(folder / ALIGN.folder)]
    clips = ["--clips", str(world / "pseudo.json"), "--prefix-dir", str(prefix_dir)]
    stage(pseudo_label, folder / PSEUDO_LABEL.folder, [*preset("pseudo_labels"), *common, *upstream, *clips])
    pseudo = ["--pseudo-dir", str(folder / PSEUDO_LABEL.folder)]
    stage(distill, folder / DISTILL.folder, [*preset("distillation"), *common, *upstream, *pseudo])


def align_flags(world: Path, row: Row, common: list[str], reduced: bool, start: Path | None) -> list[str]:
    """Stage 1b's flags for a row's variant and encoder, from the pretrained CAV-MAE-shaped encoder ``start``
    (random weights when None, and for another family)."""
    encoder = ["--audio-encoder", row.encoder]
    if start is not None and row.encoder == "cav-mae":
        encoder += ["--init-encoder", str(start)]
    method = {"unaligned": ["--epochs", "0"]}.get(row.variant, ["--method", row.variant] + ["--epochs", "2"] * reduced)
    lists = ["--train-list", str(world / "align.json"), "--val-list", str(world / "val.json")]
    return [*preset("alignment"), *common, *lists, *method, *encoder]


def infer_flags(world: Path, folder: Path, row: Row, common: list[str], prefix_dir: Path) -> list[str]:
    """Without distillation the captioner needs the prefix (and its own projector) to talk about sounds;
    distilled rows use the distilled projector without prefix, as the original's inference.sh."""
    flags = [*preset("inference"), *common, "--test-list", str(world / "test.csv"), "--audio-dir", str(world / "audio")]
    flags += ["--frames-dir", str(world / "frames"), "--modality", row.modality, "--prefix-dir", str(prefix_dir)]
    if row.distilled:
        flags += ["--projector", "distilled", "--no-use-prefix", "--distill-dir", str(folder / DISTILL.folder)]
    else:
        flags += ["--projector", "llava", "--use-prefix"]
    return flags + (["--align-dir", str(folder / ALIGN.folder)] if row.modality != "image" else [])


def row_result(row: Row, out: Path, scenes: dict) -> dict:
    scores = read_manifest(out)["metrics"]["scores"]
    captions = {record["id"]: record["caption"] for record in read_jsonl(out / "predictions.jsonl")}
    return {
        "variant": row.variant,
        "encoder": row.encoder,
        "distilled": row.distilled,
        "modality": row.modality,
        "metrics": {metric: scores.get(metric) for metric in TABLE_METRICS},
        "sources": source_scores(captions, scenes),
        "name": row.name,
        "predictions": str(out / "predictions.jsonl"),
    }


def results_table(results: list[dict]) -> str:
    sources = ("heard_source_precision", "heard_source_recall")
    return markdown_table([(r["name"], r["metrics"] | r["sources"]) for r in results], (*TABLE_METRICS, *sources))


# -- the paper's claims --------------------------------------------------------------------------------------
def _audio_rows(rows: dict) -> list[str]:
    """The paper's audio rows (CAV-MAE's)."""
    return [n for n, row in rows.items() if row["modality"] == "audio" and row.get("encoder", "cav-mae") == "cav-mae"]


CLAIMS = (
    # (claim, the row that should win, the rows it should beat, factor: winner >= factor x each loser)
    ("aligned >> unaligned (CIDEr-D at least 2x)", Row("ot_att", False, "audio").name, ["Unaligned encoder"], 2.0),
    ("OT-Att >= MMD and >= OT", Row("ot_att", False, "audio").name, ["DALI-MMD", "DALI-OT"], 1.0),
    ("distillation helps OT-Att", Row("ot_att", True, "audio").name, [Row("ot_att", False, "audio").name], 1.0),
    # stage 2's premise: the pseudo-captioning teacher is better than the same model on audio alone
    (
        "audio + image beats audio alone",
        Row("ot_att", False, "audio_vis").name,
        [Row("ot_att", False, "audio").name],
        1.0,
    ),
    ("audio + image is the best audio row", Row("ot_att", False, "audio_vis").name, _audio_rows, 1.0),
)


def check_claims(seed_rows: list[dict[str, dict]], metric: str = "cider_d") -> list[dict]:
    """Each claim on CIDEr-D: per seed, the winner's margin over its closest rival (winner - factor x rival).

    ``difference`` is the mean margin over seeds and ``spread`` its standard deviation (None for one seed).
    A claim holds when the mean margin is positive and, over several seeds, larger than its spread.
    """
    report = []
    for claim, winner, rivals, factor in CLAIMS:
        margins = []
        for rows in seed_rows:
            names = rivals(rows) if callable(rivals) else rivals
            if winner not in rows or not all(name in rows for name in names):
                break
            score = rows[winner]["metrics"][metric]
            margins.append(min(score - factor * rows[name]["metrics"][metric] for name in names if name != winner))
        if len(margins) < len(seed_rows) or not margins:
            report.append({"claim": claim, "holds": None, "difference": None, "spread": None, "note": "rows not run"})
            continue
        mean = statistics.fmean(margins)
        spread = statistics.stdev(margins) if len(margins) > 1 else None
        holds = mean > 0 and (spread is None or mean > spread)
        report.append({"claim": claim, "holds": holds, "difference": round(mean, 4), "spread": spread})
    return report


def claims_text(claims: list[dict]) -> str:
    lines = ["The paper's claims on this run (CIDEr-D margin of the winner over its closest rival):"]
    for claim in claims:
        if claim["holds"] is None:
            lines.append(f"- {claim['claim']}: not checked ({claim['note']}; `make demo-full` or `--seeds`)")
            continue
        spread = f" ± {claim['spread']:.3f} (std over seeds)" if claim["spread"] is not None else ""
        verdict = "holds" if claim["holds"] else "does NOT hold"
        lines.append(f"- {claim['claim']}: {verdict} (margin {claim['difference']:+.3f}{spread})")
    return "\n".join(lines) + "\n"


def summarise_seeds(runs: list[dict]) -> dict:
    """Mean and standard deviation over seeds of every metric of every row, and the claims across seeds."""
    seed_rows = [{row["name"]: row for row in run["rows"]} for run in runs]
    rows = []
    for name in seed_rows[0]:
        values = [row_values(rows_of_seed[name]) for rows_of_seed in seed_rows]
        rows.append(
            {
                "name": name,
                "mean": {k: statistics.fmean(v[k] for v in values) for k in values[0]},
                "std": {k: statistics.stdev(v[k] for v in values) for k in values[0]},
                "per_seed": values,
            }
        )
    return {"seeds": len(runs), "rows": rows, "claims": check_claims(seed_rows)}


def row_values(row: dict) -> dict[str, float]:
    return {k: v for k, v in (row["metrics"] | row["sources"]).items() if v is not None}


def seeds_markdown(summary: dict) -> str:
    metrics = list(summary["rows"][0]["mean"])
    header = "| system | " + " | ".join(metrics) + " |\n|" + "---|" * (len(metrics) + 1) + "\n"
    body = "".join(
        f"| {row['name']} | " + " | ".join(f"{row['mean'][m]:.3f} ± {row['std'][m]:.3f}" for m in metrics) + " |\n"
        for row in summary["rows"]
    )
    title = f"# Synthetic world over {summary['seeds']} seeds (mean ± standard deviation)\n\n"
    return title + header + body + "\n" + claims_text(summary["claims"])


def plot_results(results: list[dict], path: Path) -> None:
    """The table as grouped bars, one group per metric (CIDEr-D scaled by 1/10 to share the axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    metrics = list(TABLE_METRICS)
    width = 0.8 / max(len(results), 1)
    figure, axis = plt.subplots(figsize=(11, 4.5))
    for i, row in enumerate(results):
        values = [(row["metrics"][m] or 0) / (10 if m == "cider_d" else 1) for m in metrics]
        axis.bar(np.arange(len(metrics)) + i * width, values, width, label=row["name"])
    axis.set_xticks(np.arange(len(metrics)) + width * (len(results) - 1) / 2)
    axis.set_xticklabels([("CIDEr-D / 10" if m == "cider_d" else m) for m in metrics])
    axis.set_ylabel("score")
    axis.set_title("DALI on the synthetic world (audio-only test clips)")
    axis.legend(fontsize=8, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
