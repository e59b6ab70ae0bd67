"""A run: the folder of one training of the method, found by name or path, and what its finished stages recorded
(the LLaVA they were made with, the prompt). Each stage's folder in it is the stage table's
(:mod:`dali.stage_table`), unless a flag names it elsewhere (``--align-dir``); the manifests are read here, and
nowhere else."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from dali.errors import DaliError, ModelLoadError
from dali.runs import MANIFEST, check_llava, check_run_name, read_manifest
from dali.stage_table import ALIGN, DISTILL, PREFIX, STAGES, StageRow

RECORDED_ORDER = (ALIGN, DISTILL, PREFIX)  # whose records of the LLaVA and the prompt count first


def captioning_stages(projector: str, use_prefix: bool, audio: bool = True) -> list[StageRow]:
    """The trained stages one way of captioning loads: the aligned encoder (when it hears audio), the prefix, and
    the distilled projector (``projector="distilled"``)."""
    return [ALIGN] * audio + [PREFIX] * use_prefix + [DISTILL] * (projector == "distilled")


DEFAULT_CONV_MODE = "v1"  # the original's training prompt: what our stages train and caption with
IMPORTED_CONV_MODE = "llava_v1"  # its inference prompt: what the released weights were scored with


class RunNotFound(DaliError, FileNotFoundError):
    """No run folder under the given path or name."""


@dataclass(frozen=True)
class Run:
    """A run folder (``<expe-dir>/<run>``), and the stage folders that flags name elsewhere (``--align-dir``)."""

    folder: Path
    elsewhere: dict[str, Path] = field(default_factory=dict)  # stage name -> the folder a flag gave
    name: str | None = None  # the --run name the folder came from: checked when a stage's folder is taken from it

    @classmethod
    def find(cls, run: str | Path, expe_dir: str | Path = "expe") -> "Run":
        """A finished run (its align stage done) given as a folder, or as a run's name under ``expe_dir``."""
        for folder in (Path(run), Path(expe_dir) / str(run)):
            if (folder / ALIGN.folder / MANIFEST).is_file():
                return cls(folder)
        raise RunNotFound(
            f"--run '{run}': neither '{run}' nor '{Path(expe_dir) / str(run)}' is a run folder with a finished "
            f"{ALIGN.folder}/"
        )

    @classmethod
    def of(cls, config: Any) -> "Run":
        """A stage's run: ``--expe-dir``/``--run``, with the upstream folders its flags give."""
        given = {row: getattr(config, row.flag, None) for row in STAGES if row.flag}
        elsewhere = {row.name: Path(folder) for row, folder in given.items() if folder}
        return cls(Path(config.expe_dir) / str(config.run), elsewhere, name=config.run)

    def stage(self, row: StageRow) -> Path:
        return self.elsewhere.get(row.name) or self.at(row.folder)

    def at(self, folder: str) -> Path:
        """A folder of the run (``--run`` must then be a plain name)."""
        if self.name is not None:
            check_run_name(self.name)
        return self.folder / folder

    def flag(self, row: StageRow) -> str:
        """The flag that named the stage's folder, for messages."""
        return f"--{row.flag.replace('_', '-')}" if row.name in self.elsewhere and row.flag else "--run"

    def finished(self, row: StageRow) -> bool:
        return (self.stage(row) / MANIFEST).is_file()

    def default_projector(self) -> str:
        """What the run captions audio with by default: its distilled projector when it has one (inference.sh),
        else LLaVA's own."""
        return "distilled" if self.finished(DISTILL) else "llava"

    def manifests(self, rows: Iterable[StageRow]) -> list[tuple[Path, dict]]:
        """(folder, manifest) of each of these stages that finished, in :data:`RECORDED_ORDER` first."""
        rows = list(rows)
        ordered = [row for row in RECORDED_ORDER if row in rows] + [row for row in rows if row not in RECORDED_ORDER]
        return [(self.stage(row), read_manifest(self.stage(row))) for row in ordered if self.finished(row)]

    def llava(self, given: str | None = None, rows: Iterable[StageRow] = RECORDED_ORDER, allow_modified=False) -> str:
        """``given``, else the LLaVA these stages' manifests record; either is checked against the fingerprint the
        run recorded (its config and weight files' headers: :func:`dali.runs.model_fingerprint`), so a run loaded
        from anywhere uses the LLaVA it was made with or says why not (``allow_modified``: a difference warns)."""
        records = (_recorded_llava(folder, manifest) for folder, manifest in self.manifests(rows))
        found = next(filter(None, records), None)
        if not (given or found):
            raise ModelLoadError("--llava is needed: no finished upstream stage of this run names the LLaVA it used")
        llava, recorded = given or found[0], found[1] if found else {}
        if not given and recorded.get("config_sha256") and not Path(llava).is_dir():
            raise ModelLoadError(
                f"the LLaVA this run was made with, '{llava}', is not there (from '{Path.cwd()}'); pass --llava"
            )
        check_llava(llava, recorded, allow_modified, "this run was made with")
        return llava

    def conv_mode(self, rows: Iterable[StageRow] = RECORDED_ORDER) -> str:
        """The prompt a run's captions use by default: the first one its finished stages recorded (an input; a metric
        in runs before 2026-12), else ``llava_v1`` for imported weights and ``v1`` for runs trained here."""
        manifests = [manifest for _, manifest in self.manifests(rows)]
        for manifest in manifests:
            mode = (manifest.get("inputs", {}).get("conv_mode") or {}).get("value")
            if mode or manifest.get("metrics", {}).get("conv_mode"):
                return mode or manifest["metrics"]["conv_mode"]
        imported = any(manifest.get("stage", "").startswith("import_original") for manifest in manifests)
        return IMPORTED_CONV_MODE if imported else DEFAULT_CONV_MODE


def _recorded_llava(folder: Path, manifest: dict) -> tuple[str, dict] | None:
    """(where the LLaVA is now, its recorded fingerprint) that a finished stage names: the path recorded inside its
    run when there is one (a run copied elsewhere), else the resolved path recorded (an input; a metric in runs
    before 2026-12, as typed)."""
    recorded = manifest.get("inputs", {}).get("llava") or {}
    inside = recorded.get("in_run") and folder.parent / recorded["in_run"]
    llava = str(inside) if inside and inside.exists() else recorded.get("path")
    llava = llava or manifest.get("metrics", {}).get("llava")
    return (llava, recorded) if llava else None
