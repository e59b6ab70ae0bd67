"""``dali reproduce``: the paper's evaluation of a finished run, over sampling seeds, with the clips it scored (its
flags: ``command_configs.ReproduceConfig``).

Each row and seed is a ``dali infer`` folder of the run, run in-process, and reused when it finished with the same
settings and inputs (:func:`dali.runs.finished_differs`). The table (mean ± std over seeds), its clip accounting
and the per-clip file are written into the reproduce folder; its manifest, last, records every input.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from dali.artifacts import PREDICTIONS_FILE, SCORES_JSON
from dali.command_configs import InferConfig, ReproduceConfig
from dali.cpu_kernels import pin_torch
from dali.data import read_caption_csv
from dali.evaluation import DCASE_METRICS, TABLE_METRICS
from dali.files import atomic_write_json, atomic_write_text
from dali.flags import argv_of, config_to_dict, parse_config
from dali.jsonl import atomic_write_jsonl, read_jsonl
from dali.logs import log, setup_logging
from dali.run import Run, captioning_stages
from dali.runs import MANIFEST, Stage, StageStateError, finished_differs, require_finished, stage_main
from dali.stage_table import ALIGN, DISTILL, PREFIX, REPRODUCE, infer_folder
from dali.stages import infer

RESULTS_JSON, RESULTS_MD, PER_CLIP = REPRODUCE.outputs
MODALITY_NAMES = {"audio": "audio", "audio_vis": "audio + image", "image": "image"}
LEGACY_METRICS = ("bleu_1", "bleu_4", "meteor", "rouge_l", "cider_d", "spice", "spider", "sbert_sim")


@dataclass(frozen=True)
class TestSet:
    name: str  # the corpus it plays: "audiocaps" or "clotho"
    title: str
    folder: Path  # test.csv, audio/ and (AudioCaps) frames/

    @property
    def test_list(self) -> Path:
        return self.folder / "test.csv"


@dataclass(frozen=True)
class Row:
    """One row of the table: a test set captioned from one modality, with one projector (and prefix or not)."""

    test_set: TestSet
    modality: str
    projector: str
    use_prefix: bool

    @property
    def name(self) -> str:
        return f"{self.test_set.title}, {MODALITY_NAMES[self.modality]}"


def table_rows(config: ReproduceConfig, run: Run) -> list[Row]:
    """The paper's rows: AudioCaps from each modality, then the cross-domain row (Clotho from audio). The audio rows
    use the distilled projector without prefix when the run has one (inference.sh), else LLaVA's with the prefix;
    the rows that see the frame use LLaVA's projector with the prefix, as the pseudo-labelling teacher (audio +
    image) and the image captioner (image) do: the distilled projector learned audio tokens only."""
    has_prefix = run.finished(PREFIX)
    projector = config.projector or run.default_projector()
    audio_prefix = projector == "llava" and has_prefix
    audiocaps = TestSet("audiocaps", "AudioCaps", Path(config.audiocaps))
    rows = [
        Row(audiocaps, m, projector, audio_prefix) if m == "audio" else Row(audiocaps, m, "llava", has_prefix)
        for m in ("audio", "audio_vis", "image")
        if m in config.modalities
    ]
    if config.clotho:
        clotho = TestSet("clotho", "Clotho (cross-domain)", Path(config.clotho))
        rows.append(Row(clotho, "audio", projector, audio_prefix))
    for row in rows:
        if not row.test_set.test_list.is_file():
            raise StageStateError(
                f"--{row.test_set.name}: '{row.test_set.test_list}' does not exist (the set's CSV, named test.csv)"
            )
    return rows


def seeds_of(config: ReproduceConfig) -> list[int]:
    """Sampling rows run once per seed; greedy and beam decoding do not depend on it, so they run once."""
    return list(range(config.seed, config.seed + (config.seeds if config.strategy == "sample" else 1)))


def infer_config(config: ReproduceConfig, run: Run, row: Row, seed: int) -> InferConfig:
    """The ``dali infer`` config of one row and seed: every path absolute and the LLaVA and prompt resolved, so a
    finished folder can be compared with it from anywhere."""
    uses = captioning_stages(row.projector, row.use_prefix, audio=row.modality != "image")
    folders = {row_.flag: str(run.stage(row_).resolve()) for row_ in uses}
    frames = row.test_set.folder / "frames"
    tag = f"{row.test_set.name}_seed{seed}"
    return dataclasses.replace(
        parse_config(InferConfig, ["--test-list", str(row.test_set.test_list)]),
        **{name: getattr(config, name) for name in SHARED_WITH_INFER},
        out=str(run.at(infer_folder(row.modality, tag)).resolve()),
        test_list=str(row.test_set.test_list.resolve()),
        audio_dir=str((row.test_set.folder / "audio").resolve()),
        frames_dir=str(frames.resolve()) if row.modality != "audio" else None,
        modality=row.modality,
        tag=tag,
        projector=row.projector,
        use_prefix=row.use_prefix,
        seed=seed,
        llava=run.llava(config.llava, uses, config.allow_modified),
        conv_mode=config.conv_mode or run.conv_mode(uses),
        **folders,
    )


SHARED_WITH_INFER = (
    "strategy", "temperature", "num_beams", "max_new_tokens", "engine", "dtype", "device", "num_workers", "on_error",
    "allow_modified", "frame_index", "batch_size", "limit", "sbert", "metric_models",
)  # fmt: skip


def run_infer(config: ReproduceConfig, stage: Stage, run: Run, row: Row, seed: int) -> Path:
    """One row and seed's infer folder: reused when finished with these settings and inputs, else made (or
    resumed); a finished one made otherwise is redone only with --overwrite."""
    settings = infer_config(config, run, row, seed)
    out = Path(settings.out)
    if (out / MANIFEST).is_file():
        reason = finished_differs(out, config_to_dict(settings))
        if reason is None:
            log.info("reusing %s", out)
            stage.add_input(out.name, out)
            return out
        if not config.overwrite:
            raise StageStateError(f"'{out}' is finished but {reason}: pass --overwrite to redo it")
    flags = ["--overwrite"] if (out / MANIFEST).is_file() else ["--resume"] if out.exists() else []
    code = infer.main([*argv_of(settings), *flags])
    if code:
        raise StageStateError(f"dali infer failed for {row.name}, seed {seed} (status {code}); see its log above")
    stage.add_input(out.name, out)
    return out


def list_sha256(ids) -> str:
    """The hash of a list of clip ids (sorted, one per line): two users who scored the same clips have the same."""
    return hashlib.sha256("".join(f"{clip_id}\n" for clip_id in sorted(ids)).encode()).hexdigest()


def row_result(row: Row, folders: dict[int, Path], allow_modified: bool) -> tuple[dict, list[dict]]:
    """A row's scores over its seeds (mean, standard deviation, each seed's; a metric some seed lacks is not
    averaged) and the clips every seed scored; and its per-clip lines (each seed's caption and scores of each clip).
    Each file read is the one its infer folder's manifest records."""
    per_seed, lines, scored = {}, [], None
    for seed, folder in folders.items():
        require_finished(folder, "infer", f"{row.name}, seed {seed}", (PREDICTIONS_FILE, SCORES_JSON), allow_modified)
        result = json.loads((folder / SCORES_JSON).read_text(encoding="utf-8"))
        captions = {record["id"]: record["caption"] for record in read_jsonl(folder / PREDICTIONS_FILE)}
        per_seed[seed] = result
        clips = set(result["per_clip"])
        scored = clips if scored is None else scored & clips
        base = {"set": row.test_set.name, "row": row.name, "modality": row.modality, "seed": seed}
        lines += [base | {"id": i, "caption": captions.get(i), "scores": s} for i, s in result["per_clip"].items()]
    metrics = sorted(set.intersection(*(set(result["scores"]) for result in per_seed.values())))
    values = {m: [r["scores"][m] for r in per_seed.values()] for m in metrics}
    unavailable = {m: why for r in per_seed.values() for m, why in r["unavailable"].items() if m not in metrics}
    unavailable |= {m: "not scored under every seed" for r in per_seed.values() for m in r["scores"] if m not in values}
    summary = {
        "name": row.name,
        "set": row.test_set.name,
        "modality": row.modality,
        "projector": row.projector,
        "use_prefix": row.use_prefix,
        "seeds": list(folders),
        "folders": {str(seed): str(folder) for seed, folder in folders.items()},
        "mean": {m: statistics.fmean(v) for m, v in values.items()},
        "std": {m: statistics.stdev(v) if len(v) > 1 else None for m, v in values.items()},
        "per_seed": {str(seed): result["scores"] for seed, result in per_seed.items()},
        "unavailable": unavailable,
        "scored": sorted(scored or ()),
    }
    return summary, lines


def clip_accounting(rows: list[dict], test_sets: dict[str, TestSet], limit: int | None) -> dict:
    """Per test set: the clips its list holds (its first ``limit``), and per row how many were scored (by every
    seed), which are missing, and the hash of the list scored."""
    accounts = {}
    for name, test_set in test_sets.items():
        listed = [clip.id for clip in read_caption_csv(test_set.test_list, test_set.folder / "audio")][:limit]
        per_row = {}
        for row in (r for r in rows if r["set"] == name):
            scored = set(row["scored"])
            missing = [clip_id for clip_id in listed if clip_id not in scored]
            per_row[row["name"]] = {"scored": len(scored), "missing": missing, "scored_sha256": list_sha256(scored)}
        accounts[name] = {"test_list": str(test_set.test_list), "listed": len(listed), "rows": per_row}
    return accounts


def _cell(row: dict, metric: str) -> str:
    mean, std = row["mean"].get(metric), row["std"].get(metric)
    if mean is None:
        return "n/a"
    shown = f"{mean:.0f}" if metric == "vocab" else f"{mean:.4f}"
    return shown + (f" ± {std:.4f}" if std is not None and metric != "vocab" else f" ± {std:.1f}" if std else "")


def metric_table(rows: list[dict], metrics: tuple[str, ...]) -> str:
    """Mean ± standard deviation over seeds; a metric no row has is left out (the notes say why)."""
    shown = [m for m in metrics if any(m in row["mean"] for row in rows)]
    if not shown:
        return "(none of these metrics could be computed)\n"
    lines = ["| row | seeds | " + " | ".join(shown) + " |", "|" + "---|" * (len(shown) + 2)]
    lines += [f"| {r['name']} | {len(r['seeds'])} | " + " | ".join(_cell(r, m) for m in shown) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def results_markdown(results: dict) -> str:
    rows, decoding = results["rows"], results["decoding"]
    lines = [
        f"# `dali reproduce`: {results['run']}",
        "",
        f"Decoding: {decoding}; LLaVA `{results['llava']}`. Mean ± standard deviation over seeds.",
        "",
        "## Legacy metrics (the paper's)",
        "",
        metric_table(rows, LEGACY_METRICS),
        "## DCASE metrics",
        "",
        metric_table(rows, DCASE_METRICS),
    ]
    notes = sorted({(m, why) for row in rows for m, why in row["unavailable"].items()})
    lines += ["Not computed:", ""] + [f"- {m}: {why}" for m, why in notes] + [""] if notes else []
    lines += ["## The clips scored", "", "| set | listed | row | scored | missing | sha256 of the list scored |"]
    lines += ["|---|---|---|---|---|---|"]
    for name, account in results["clips"].items():
        for row, found in account["rows"].items():
            cells = [name, account["listed"], row, found["scored"], len(found["missing"]), found["scored_sha256"][:16]]
            lines.append("| " + " | ".join(map(str, cells)) + " |")
    missing = {
        (name, m) for name, account in results["clips"].items() for f in account["rows"].values() for m in f["missing"]
    }
    if missing:
        listed = ", ".join(f"{name}:{clip_id}" for name, clip_id in sorted(missing)[:50])
        lines += ["", f"Missing clips ({len(missing)}; all in results.json): {listed}"]
    lines += ["", results["not_run"] if results.get("not_run") else ""]
    return "\n".join(lines).rstrip() + "\n"


@stage_main
def main(argv: list[str] | None = None) -> int:
    setup_logging()
    config = parse_config(ReproduceConfig, argv)
    pin_torch(threads=None)  # the demo's kernels (the `dali` entry pinned the rest): its rows repeat the demo's
    found = Run.find(config.run, config.expe_dir)
    run = Run(found.folder, {PREFIX.name: Path(config.prefix_dir)}) if config.prefix_dir else found
    rows = table_rows(config, run)
    out = Path(config.out) if config.out else run.at(REPRODUCE.folder)
    stage = Stage(out, REPRODUCE.name, overwrite=config.overwrite, resume=config.resume)
    stage.save_config(config_to_dict(config))
    for upstream in (ALIGN, PREFIX, DISTILL):
        if run.finished(upstream):
            stage.add_input(upstream.flag, run.stage(upstream))
    summaries, lines = [], []
    for row in rows:
        stage.add_input(f"{row.test_set.name}_list", row.test_set.test_list)
        folders = {seed: run_infer(config, stage, run, row, seed) for seed in seeds_of(config)}
        summary, clip_lines = row_result(row, folders, config.allow_modified)
        summaries.append(summary)
        lines += clip_lines
    results = {
        "run": str(run.folder),
        "llava": run.llava(config.llava, allow_modified=config.allow_modified),
        "decoding": decoding_text(config),
        "seeds": seeds_of(config),
        "rows": summaries,
        "clips": clip_accounting(summaries, {row.test_set.name: row.test_set for row in rows}, config.limit),
        "not_run": None if config.clotho else "The cross-domain row (Clotho) is not run: no --clotho folder.",
    }
    atomic_write_jsonl(out / PER_CLIP, lines)
    atomic_write_json(out / RESULTS_JSON, results)
    atomic_write_text(out / RESULTS_MD, results_markdown(results))
    headline = {row["name"]: {m: row["mean"].get(m) for m in TABLE_METRICS} for row in summaries}
    clips = {name: {r: f["scored_sha256"] for r, f in a["rows"].items()} for name, a in results["clips"].items()}
    stage.finish({"rows": headline, "scored_sha256": clips, "seeds": results["seeds"]}, outputs=list(REPRODUCE.outputs))
    print(results_markdown(results))
    return 0


def decoding_text(config: ReproduceConfig) -> str:
    seeds = seeds_of(config)
    how = {
        "sample": f"sampling at temperature {config.temperature}",
        "greedy": "greedy",
        "beam": f"beam search ({config.num_beams} beams)",
    }[config.strategy]
    return f"{how}, at most {config.max_new_tokens} new tokens, seeds {seeds[0]}..{seeds[-1]}"
