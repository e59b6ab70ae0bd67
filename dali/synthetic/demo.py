"""``make demo``: the whole method on the built-in synthetic world, and a results table shaped like Table 1.

World -> image captioner (cached) -> prefix tuning -> alignment per variant -> pseudo-captions ->
distillation -> audio-only captions of the test clips -> ``expe/<run>/results.{json,md,png}``.
Every stage runs through its own ``main(argv)`` with the ``configs/synthetic`` presets.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

from dali.evaluation import TABLE_METRICS, markdown_table
from dali.runs import MANIFEST, atomic_write_json, atomic_write_text, read_jsonl, read_manifest
from dali.stages import align, distill, infer, prefix_tune, pseudo_label
from dali.stages.common import log, setup_logging
from dali.synthetic.captioner import CaptionerTraining, train_captioner
from dali.synthetic.world import REDUCED, WorldConfig, generate_world, source_scores

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

    @property
    def name(self) -> str:
        label = PAPER_NAMES[self.variant]
        if self.modality == "audio_vis":
            label += " (audio + image)"
        return label + (" + distillation" if self.distilled else "")


DEFAULT_ROWS = (
    Row("image_captioner", False, "image"),
    Row("unaligned", False, "audio"),
    Row("ot_att", False, "audio"),
    Row("ot_att", True, "audio"),
    Row("ot_att", False, "audio_vis"),
)
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


def _done(folder: Path) -> bool:
    return (folder / MANIFEST).exists()


def run_stage(module, folder: Path, argv: list[str]) -> Path:
    """Run a stage unless its folder is finished; an interrupted one resumes."""
    if _done(folder):
        log.info("reusing finished stage %s", folder)
        return folder
    flags = ["--out", str(folder)] + (["--resume"] if folder.exists() else [])
    code = module.main(argv + flags)
    if code:
        raise SystemExit(f"stage {module.__name__} failed with code {code}")
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default="data/synthetic", help="where the world is generated")
    parser.add_argument("--expe-dir", default="expe")
    parser.add_argument("--run", default="demo")
    parser.add_argument("--full", action="store_true", help="every row of the table (MMD, OT, distilled baselines)")
    parser.add_argument("--reduced", action="store_true", help="a small world and short stages (tests, CI)")
    parser.add_argument("--overwrite", action="store_true", help="redo every stage of the run")
    parser.add_argument("--captioner-epochs", type=int, default=None)
    args = parser.parse_args(argv)
    setup_logging()
    started = time.time()
    data, run = Path(args.data), Path(args.expe_dir) / args.run
    if args.overwrite and run.exists():
        import shutil

        shutil.rmtree(run)
    world = generate_world(data, REDUCED if args.reduced else WorldConfig())
    training = CaptionerTraining(epochs=1) if args.reduced else CaptionerTraining()
    if args.captioner_epochs is not None:
        training = CaptionerTraining(epochs=args.captioner_epochs)
    llava = str(train_captioner(world, data / "captioner_model", training))
    common = ["--llava", llava]
    short = ["--epochs", "20"] if args.reduced else []

    prefix_dir = run_stage(
        prefix_tune,
        run / "prefix",
        ["--config", str(PRESETS / "prefix_tuning.yaml"), *common, "--pairs", str(world / "prefix_pairs.json"), *short],
    )
    rows = FULL_ROWS if args.full else DEFAULT_ROWS
    variants = sorted({row.variant for row in rows if row.variant != "image_captioner"})
    test = [
        "--config",
        str(PRESETS / "inference.yaml"),
        *common,
        "--test-list",
        str(world / "test.csv"),
        "--audio-dir",
        str(world / "audio"),
        "--frames-dir",
        str(world / "frames"),
    ]
    scenes = {scene["id"]: scene for scene in json.loads((world / "scenes.json").read_text())["test"]}
    results = []
    for variant in ["image_captioner", *variants]:
        folder = run / variant
        if variant != "image_captioner":
            method = {"unaligned": []}.get(variant, ["--method", variant])
            align_flags = [
                "--config",
                str(PRESETS / "alignment.yaml"),
                *common,
                "--train-list",
                str(world / "align.json"),
                "--val-list",
                str(world / "val.json"),
                *method,
            ]
            if variant == "unaligned":
                align_flags += ["--epochs", "0"]
            elif args.reduced:
                align_flags += ["--epochs", "2"]
            run_stage(align, folder / "align", align_flags)
            if any(row.variant == variant and row.distilled for row in rows):
                run_stage(
                    pseudo_label,
                    folder / "pseudo_label",
                    [
                        "--config",
                        str(PRESETS / "pseudo_labels.yaml"),
                        *common,
                        "--clips",
                        str(world / "pseudo.json"),
                        "--align-dir",
                        str(folder / "align"),
                        "--prefix-dir",
                        str(prefix_dir),
                    ],
                )
                run_stage(
                    distill,
                    folder / "distill",
                    [
                        "--config",
                        str(PRESETS / "distillation.yaml"),
                        *common,
                        "--align-dir",
                        str(folder / "align"),
                        "--pseudo-dir",
                        str(folder / "pseudo_label"),
                    ],
                )
        for row in (r for r in rows if r.variant == variant):
            # Without distillation the captioner needs the prefix (and its own projector) to talk about sounds;
            # distilled rows use the distilled projector without prefix, as the original's inference.sh.
            flags = ["--modality", row.modality, "--prefix-dir", str(prefix_dir)]
            if row.distilled:
                flags += ["--projector", "distilled", "--no-use-prefix", "--distill-dir", str(folder / "distill")]
            else:
                flags += ["--projector", "original", "--use-prefix"]
            if row.modality != "image":
                flags += ["--align-dir", str(folder / "align")]
            name = f"infer_{row.modality}" + ("_distilled" if row.distilled else "")
            out = run_stage(infer, folder / name, test + flags)
            scores = read_manifest(out)["metrics"]["scores"]
            captions = {record["id"]: record["caption"] for record in read_jsonl(out / "predictions.jsonl")}
            results.append(
                {
                    "variant": row.variant,
                    "distilled": row.distilled,
                    "modality": row.modality,
                    "metrics": {metric: scores.get(metric) for metric in TABLE_METRICS},
                    "sources": source_scores(captions, scenes),
                    "name": row.name,
                    "predictions": str(out / "predictions.jsonl"),
                }
            )

    atomic_write_json(run / "results.json", results)
    sources = ("heard_source_precision", "heard_source_recall")
    table = markdown_table([(r["name"], r["metrics"] | r["sources"]) for r in results], (*TABLE_METRICS, *sources))
    atomic_write_text(
        run / "results.md",
        "# Synthetic world: audio captioning on audio-only test clips\n\n"
        + table
        + "\n(*) sees the test clip's frame, not its audio. heard_source_precision / recall: the share of the "
        "sources a caption names that were heard in the clip, and of the heard sources that it names.\n",
    )
    plot_results(results, run / "results.png")
    print("\n" + table)
    log.info("demo finished in %.0f s; results in %s", time.time() - started, run / "results.json")
    return 0


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


if __name__ == "__main__":
    raise SystemExit(main())
