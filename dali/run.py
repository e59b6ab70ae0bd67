"""A run: the folder of one training of the method, found by name or path, and what its finished stages recorded
(the LLaVA they were made with, the prompt). Each stage's folder in it is the stage table's
(:mod:`dali.stage_table`); the manifests are read here, and nowhere else."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from dali.errors import DaliError, ModelLoadError
from dali.runs import MANIFEST, IntegrityError, identity_change, model_fingerprint, read_manifest
from dali.stage_table import ALIGN, DISTILL, PREFIX, StageRow

log = logging.getLogger("dali")


class RunNotFound(DaliError, FileNotFoundError):
    """No run folder under the given path or name."""


@dataclass(frozen=True)
class Run:
    """A run folder with a finished align stage: the least a run captions with."""

    folder: Path

    @classmethod
    def find(cls, run: str | Path, expe_dir: str | Path = "expe") -> "Run":
        """A run given as a folder, or as a run's name under ``expe_dir``."""
        for folder in (Path(run), Path(expe_dir) / str(run)):
            if (folder / ALIGN.folder / MANIFEST).is_file():
                return cls(folder)
        raise RunNotFound(
            f"--run '{run}': neither '{run}' nor '{Path(expe_dir) / str(run)}' is a run folder with a finished "
            f"{ALIGN.folder}/"
        )

    def stage(self, row: StageRow) -> Path:
        return self.folder / row.folder

    def finished(self, row: StageRow) -> bool:
        return (self.stage(row) / MANIFEST).is_file()

    @property
    def trained(self) -> tuple[Path, Path, Path]:
        """Its align, distill and prefix folders, in the order their records are read."""
        return self.stage(ALIGN), self.stage(DISTILL), self.stage(PREFIX)

    def llava(self, given: str | None = None, allow_modified: bool = False) -> str:
        return resolve_llava(given, *self.trained, allow_modified=allow_modified)

    @property
    def conv_mode(self) -> str:
        return recorded_conv_mode(*self.trained)


def _manifests(folders) -> list[dict]:
    return [read_manifest(folder) for folder in folders if folder is not None and (Path(folder) / MANIFEST).is_file()]


def recorded_llava(*folders) -> tuple[str, dict] | None:
    """(where the LLaVA is now, its recorded fingerprint) that the first of these finished stage folders names: the
    path recorded inside its run when there is one (a run copied elsewhere), else the resolved path recorded (an
    input; a metric in older runs, as typed)."""
    for folder in folders:
        if folder is None or not (Path(folder) / MANIFEST).is_file():
            continue
        manifest = read_manifest(folder)
        recorded = manifest.get("inputs", {}).get("llava") or {}
        inside = recorded.get("in_run") and Path(folder).parent / recorded["in_run"]
        llava = str(inside) if inside and inside.exists() else recorded.get("path")
        llava = llava or manifest.get("metrics", {}).get("llava")
        if llava:
            return llava, recorded
    return None


def resolve_llava(given: str | None, *folders, allow_modified: bool = False) -> str:
    """``given``, else the LLaVA the folders' manifests record; either is checked against the fingerprint the run
    recorded (its config and weight files' headers: :func:`dali.runs.model_fingerprint`), so a run loaded from
    anywhere uses the LLaVA it was made with or says why not (``allow_modified``: a difference only warns)."""
    found = recorded_llava(*folders)
    if not (given or found):
        raise ModelLoadError("--llava is needed: no finished upstream stage of this run names the LLaVA it used")
    llava = given or found[0]
    recorded = found[1] if found else {}
    if not given and recorded.get("config_sha256") and not Path(llava).is_dir():
        raise ModelLoadError(
            f"the LLaVA this run was made with, '{llava}', is not there (from '{Path.cwd()}'); pass --llava"
        )
    if recorded.get("config_sha256") and Path(llava).is_dir():
        change = identity_change(recorded, model_fingerprint(Path(llava)))
        if change:
            message = f"--llava '{llava}' is not the LLaVA this run was made with ({change})"
            if not allow_modified:
                raise IntegrityError(message + "; pass --allow-modified to use it anyway")
            log.warning("%s; used anyway (--allow-modified)", message)
    return llava


def recorded_conv_mode(*folders) -> str:
    """The conversation mode a run's captions use by default: the one its first finished folder records;
    ``llava_v1`` (the original's inference prompt) for imported weights, ``v1`` (the training prompt) otherwise."""
    for manifest in _manifests(folders):
        mode = manifest.get("metrics", {}).get("conv_mode")
        if mode:
            return mode
        return "llava_v1" if manifest.get("stage", "").startswith("import_original") else "v1"
    return "v1"
