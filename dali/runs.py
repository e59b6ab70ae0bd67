"""Experiment folders: ``expe/<run>/<stage>/`` with config, metrics, weights and a manifest written last.

``manifest.json`` is the "done" marker: it is written atomically after everything else, and a downstream
stage refuses an upstream folder without one. Every write that could be read back later goes through a
temporary name and ``os.replace``, so a killed process never leaves a half-written file under the real name.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from dali import stage_folder as folder
from dali.errors import DaliError, shown
from dali.files import atomic_write_json, atomic_write_text, file_sha256, read_json_object, read_plain_yaml
from dali.jsonl import MetricsLog, repair_jsonl
from dali.logs import log
from dali.stage_folder import CHECKPOINT, CONFIG, MANIFEST, METRICS
from dali.stage_table import command_of


class StageStateError(DaliError, RuntimeError):
    """A stage folder is in a state that forbids the requested action (finished, partial, missing upstream)."""


def input_fingerprint(path: str | Path, run_folder: Path | None = None) -> dict[str, Any]:
    """What an input is, by content: a file's sha256; a stage folder's manifest's; a model folder's
    (:func:`model_fingerprint`); else whether it exists (a hub id, say). Its path is recorded resolved, and, when it
    lies inside ``run_folder``, also relative to it (a run copied elsewhere finds it there)."""
    given = Path(path)
    found: dict[str, Any] = {"path": str(given.resolve()) if given.exists() else str(path)}
    if run_folder is not None and given.exists() and run_folder.resolve() in given.resolve().parents:
        found["in_run"] = str(given.resolve().relative_to(run_folder.resolve()))
    if given.is_file():
        return found | {"sha256": file_sha256(given)}
    if (given / MANIFEST).is_file():
        return found | {"manifest_sha256": file_sha256(given / MANIFEST)}
    if (given / "config.json").is_file():
        return found | model_fingerprint(given)
    return found | {"exists": given.exists()}


IDENTITY_KEYS = ("sha256", "manifest_sha256", "config_sha256", "weights", "exists", "value")
SAFETENSORS_HEADER_MAX = 1 << 27  # 128 MiB: a 7B checkpoint's header is a few hundred kB


def model_fingerprint(folder: Path) -> dict[str, Any]:
    """A model folder by content, cheaply: its config's sha256 and, per weight file, its size and (safetensors)
    the sha256 of its header, which lists every tensor's name, dtype, shape and byte offsets."""
    weights = {}
    for file in sorted(folder.iterdir()):
        if file.suffix in (".safetensors", ".bin", ".pt", ".pth") and file.is_file():
            weights[file.name] = {"bytes": file.stat().st_size}
            if file.suffix == ".safetensors":
                weights[file.name]["header_sha256"] = _safetensors_header_sha256(file)
    return {"config_sha256": file_sha256(folder / "config.json"), "weights": weights}


def _safetensors_header_sha256(file: Path) -> str:
    with open(file, "rb") as stream:
        size = int.from_bytes(stream.read(8), "little")
        header = stream.read(min(size, SAFETENSORS_HEADER_MAX))  # bounded: the length is the file's own claim
    return hashlib.sha256(size.to_bytes(8, "little") + header).hexdigest()


def identity_change(recorded: dict[str, Any], current: dict[str, Any]) -> str | None:
    """How ``current`` differs, by content, from the ``recorded`` fingerprint of the same input, or None."""
    for key in IDENTITY_KEYS:
        if key in recorded and recorded[key] != current.get(key):
            return f"its {key.replace('_', ' ')} differs from the one recorded"
    return None


def check_llava(llava: str, recorded: dict[str, Any] | None, allow_modified: bool, made: str) -> None:
    """A local LLaVA folder must be the one recorded (its config's sha256 and weight files' headers: ``recorded``,
    a :func:`model_fingerprint`); ``allow_modified``: a difference only warns. A hub id is taken by name."""
    if not (recorded and recorded.get("config_sha256")) or not Path(llava).is_dir():
        return
    change = identity_change(recorded, model_fingerprint(Path(llava)))
    if change:
        message = f"--llava '{llava}' is not the LLaVA {made} ({change})"
        if not allow_modified:
            raise IntegrityError(message + "; pass --allow-modified to use it anyway")
        log.warning("%s; used anyway (--allow-modified)", message)


def git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, str]:
    import numpy
    import torch
    import transformers

    found = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
    }
    try:
        import ot

        found["pot"] = ot.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        found["cuda_device"] = torch.cuda.get_device_name(0)
    return found


# Config keys that may change between a run and its --resume: how it runs, not what it computes.
RESUME_FREE_KEYS = frozenset(
    {"overwrite", "resume", "device", "num_workers", "checkpoint_every", "emd_workers", "compile", "evaluate", "sbert"}
    | {"cache_vision_tokens", "cache_audio_features", "cache_audio_tokens", "gradient_checkpointing"}
    | {"allow_modified"}
)
NAME_BYTES = 200  # a name becomes part of a folder name (255 bytes at most) beside a prefix such as 'infer_audio_'


def check_run_name(name: str, flag_name: str = "--run") -> str:
    """The one check of every name that becomes a path (``--run``, ``--tag``, a variant): a plain folder name,
    with no separator, not '.' or '..', no NUL, no control character, at most :data:`NAME_BYTES` bytes."""
    bad = (
        not name
        or name in (".", "..")
        or any(char in "/\\" or char == os.sep or ord(char) < 32 for char in name)
        or len(name.encode("utf-8", "surrogateescape")) > NAME_BYTES
    )
    if bad:
        raise StageStateError(
            f"{flag_name} {name!r} must be a plain name (one folder name, at most {NAME_BYTES} bytes, no '/'); "
            "give a folder with --out instead"
        )
    return name


class Stage:
    """One stage folder, moved through the states of :mod:`dali.stage_folder` according to the flags, finished
    with a manifest.

    Nothing is written before the folder's state is known, and a folder that is not ours is never written into.
    ``--overwrite`` moves the old run into ``.previous/`` at the first write (after the stage has loaded its inputs
    and models); ``finish`` writes the manifest, then removes it; a run that fails puts it back (``close``, called
    by :func:`stage_main`). The folder is locked while a process uses it.
    """

    def __init__(self, path: str | Path, name: str, overwrite: bool = False, resume: bool = False, writer: bool = True):
        self.path = Path(path)
        self.name = name
        self.started = time.time()
        self.writer = writer  # the one process that writes the folder (rank 0); the others only read it
        self.overwrite, self.resume = overwrite, resume
        self.inputs: dict[str, dict[str, Any]] = {}
        running = _RUNNING.get()
        self.command: list[str] = running.command if running else list(sys.argv)
        self.folder_id: str | None = None
        self._lock: int | None = None
        self._opened = self._finished = self._replaced = False
        found = folder.state(self.path, name)
        self._created = found is folder.State.ABSENT
        if not writer:
            return
        if found is folder.State.FOREIGN:
            raise StageStateError(
                f"'{self.path}' is not a dali {name} stage folder ({self._foreign_reason()}); "
                "it is never written into or replaced: choose another --out or --run"
            )
        self.path.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        if running:
            running.stages.append(self)
        try:
            self.folder_id = folder.claim(self.path, name)
            folder.recover(self.path)
            folder.sweep_temporaries(self.path)
            self._check_flags(self.state)
            if self.resuming:
                repair_jsonl(self.path / METRICS)  # a torn last line from the kill
        except BaseException:
            self.close()
            raise

    def _foreign_reason(self) -> str:
        if self.path.is_symlink() or not self.path.is_dir():
            return "it is a link or a file, not a folder"
        return folder.ownership_problem(self.path, self.name) or "unknown"

    def _check_flags(self, state: folder.State) -> None:
        if state is folder.State.FINISHED and not self.overwrite:
            raise StageStateError(
                f"stage folder '{self.path}' is finished (it has a {MANIFEST}); pass --overwrite to redo it"
            )
        if state in (folder.State.INTERRUPTED, folder.State.REPLACING) and not (self.resume or self.overwrite):
            kept = " (the run it replaced is kept in .previous/)" if state is folder.State.REPLACING else ""
            raise StageStateError(
                f"stage folder '{self.path}' holds an unfinished run{kept}; pass --resume to continue it or --overwrite"
            )

    def _take_lock(self) -> None:
        """The folder's lock (:func:`dali.stage_folder.take_lock`); a second writer is refused."""
        self._lock = folder.take_lock(self.path)
        if self._lock is None:
            holder = folder.lock_holder(self.path)
            raise StageStateError(f"stage folder '{self.path}' is in use by another process (PID {holder})")

    @property
    def state(self) -> folder.State:
        """The folder's state; it is ours (checked when the stage opened it, and locked since)."""
        return folder.run_state(self.path)

    @property
    def resuming(self) -> bool:
        return self.resume and self.state in (folder.State.INTERRUPTED, folder.State.REPLACING)

    def _open(self) -> None:
        """First write: an overwrite moves the old run aside now, once the stage has got this far."""
        if self._opened or not self.writer:
            return
        self._opened = True
        state, fresh = self.state, self.overwrite and not self.resume
        if state is folder.State.FINISHED or (fresh and state is folder.State.INTERRUPTED):
            self._replaced = True
            folder.move_aside(self.path)
        elif fresh and state is folder.State.REPLACING:
            self._replaced = True  # a replacement was killed: drop its files, keep the run it was replacing
            folder.remove_run(self.path)
        if self.inputs:  # recorded before the first write
            atomic_write_json(self.path / folder.INPUTS, self.inputs)

    def save_config(self, config: dict[str, Any]) -> None:
        """Write ``config.yaml``; on --resume, refuse a config that changes what the run computes."""
        if not self.writer:
            return
        if self.resuming and (self.path / CONFIG).exists():
            try:
                saved = read_plain_yaml(self.path / CONFIG) or {}
            except (OSError, UnicodeDecodeError, ValueError) as error:
                raise StageStateError(f"--resume: cannot read the run's config: {error}") from None
            details = changed_settings(saved, config)
            if details:
                raise StageStateError(
                    f"--resume: '{self.path}' was started with other settings ({details}); "
                    "resume with the same flags, or pass --overwrite to start again"
                )
        self._open()
        atomic_write_text(self.path / CONFIG, yaml.safe_dump(config, sort_keys=False))

    def add_input(self, name: str, path: str | Path) -> None:
        """Record an input by content as the run starts (``inputs.json``); on --resume, one that changed since is
        refused, as a changed setting is; one inside this stage's own folder is refused (an overwrite removes it)."""
        flag = f"--{name.replace('_', '-')}"
        resolved, own = Path(path).resolve(), self.path.resolve()
        if self.writer and (resolved == own or own in resolved.parents):
            raise StageStateError(
                f"{flag} '{path}' is inside this stage's own folder '{self.path}': a stage never writes into its "
                "inputs; choose another --out"
            )
        self._record_input(name, input_fingerprint(path, self.path.parent), f"{flag} '{path}'")

    def add_setting(self, name: str, value: Any) -> None:
        """Record, as an input by value, a setting the results depend on that may come from upstream rather than a
        flag of this stage (the prompt: ``conv_mode``); on --resume, a changed one is refused."""
        self._record_input(name, {"value": value}, f"--{name.replace('_', '-')} {shown(value)}")

    def _record_input(self, name: str, fingerprint: dict[str, Any], described: str) -> None:
        recorded = (read_json_object(self.path / folder.INPUTS) or {}).get(name) if self.resuming else None
        change = isinstance(recorded, dict) and identity_change(recorded, fingerprint)
        if change:
            raise StageStateError(
                f"--resume: {described} is not the input '{self.path}' was started with ({change}); its results "
                "would mix the two: resume with the same input, or pass --overwrite to start again"
            )
        self.inputs[name] = fingerprint
        if self._opened and self.writer:
            atomic_write_json(self.path / folder.INPUTS, self.inputs)

    def metrics(self) -> "MetricsLog":
        self._open()
        return MetricsLog(self.path / METRICS, enabled=self.writer)

    def finish(self, metrics: dict[str, Any], outputs: list[str]) -> Path | None:
        """Write the manifest last: the stage is done once it exists. Then the replaced run goes."""
        if not self.writer:
            return None
        self._open()
        missing = [name for name in outputs if not (self.path / name).exists()]
        if missing:
            raise StageStateError(f"stage '{self.name}' cannot finish: outputs {missing} were not written")
        manifest = {
            "stage": self.name,
            "folder_id": self.folder_id,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "wall_time_s": round(time.time() - self.started, 3),
            "git_commit": git_commit(),
            "versions": versions(),
            "command": self.command,
            "inputs": self.inputs,
            "outputs": {name: file_sha256(self.path / name) for name in outputs},
            "metrics": metrics,
        }
        (self.path / CHECKPOINT).unlink(missing_ok=True)
        written = atomic_write_json(self.path / MANIFEST, manifest)
        self._finished = True
        if (self.path / folder.PREVIOUS).exists():
            folder.remove_tree(self.path / folder.PREVIOUS)
        return written

    def close(self) -> None:
        """Release the lock. A run that did not finish after replacing one puts the replaced run back."""
        if self._lock is None:
            return
        if self._replaced and not self._finished and (self.path / folder.PREVIOUS).is_dir():
            folder.put_back(self.path)
        lock, self._lock = self._lock, None
        folder.release_lock(self.path, lock, remove_folder=self._created)


def changed_settings(saved: dict[str, Any], config: dict[str, Any], free: frozenset = RESUME_FREE_KEYS) -> str | None:
    """The settings (outside ``free``) that differ between a stage's saved config and ``config``, as flags, or
    None."""
    changed = sorted(key for key in set(saved) | set(config) if key not in free and saved.get(key) != config.get(key))
    details = (f"--{k.replace('_', '-')}: {shown(saved.get(k))} -> {shown(config.get(k))}" for k in changed[:10])
    return "; ".join(details) or None


PLACE_KEYS = frozenset({"out", "run", "expe_dir"})  # where a stage wrote, not what it computed


def finished_differs(path: str | Path, config: dict[str, Any]) -> str | None:
    """Why the finished stage folder ``path`` is not what ``config`` would compute now, or None: a setting that
    differs (beyond those free on --resume, and where it was written), or an input recorded by content that has
    changed since (an upstream stage redone, a list edited). A caller reuses the folder only on None."""
    path = Path(path)
    try:
        saved = read_plain_yaml(path / CONFIG) or {}
    except (OSError, UnicodeDecodeError, ValueError) as error:
        return f"its {CONFIG} is unreadable ({shown(str(error), 200)})"
    if not isinstance(saved, dict):
        return f"its {CONFIG} is not a mapping"
    if "conv_mode" in config and config["conv_mode"] is None:
        # no --conv-mode: the captioner's own prompt, which the stage resolved and saved (the captioner is an input
        # compared by content below)
        config = {**config, "conv_mode": saved.get("conv_mode")}
    details = changed_settings(saved, config, RESUME_FREE_KEYS | PLACE_KEYS)
    if details:
        return f"it was made with other settings ({details})"
    for name, recorded in (read_json_object(path / folder.INPUTS) or {}).items():
        if isinstance(recorded, dict) and "value" not in recorded and isinstance(recorded.get("path"), str):
            change = identity_change(recorded, input_fingerprint(recorded["path"]))
            if change:
                return f"its input --{name.replace('_', '-')} '{recorded['path']}' changed since ({change})"
    return None


@dataclasses.dataclass
class _Running:
    """A stage's ``main`` while it runs: the command line that reruns it, and the stage folders it opened."""

    command: list[str]
    stages: list["Stage"] = dataclasses.field(default_factory=list)


_RUNNING: contextvars.ContextVar[_Running | None] = contextvars.ContextVar("dali_running", default=None)


def stage_main(main: Callable[..., int]) -> Callable[..., int]:
    """Wrap a stage's ``main``: every stage it opened is closed on return or error (lock, restore), and its manifest
    records the command that reruns it: the process's own, or, called in-process with ``argv`` (the demo does),
    ``python -m dali.cli <its command> <argv>``."""

    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None) -> int:
        # the process's own command line when ``argv`` is its tail (``dali align ...``, ``python -m dali.cli ...``)
        in_process = argv is not None and list(argv) != sys.argv[len(sys.argv) - len(argv) :]
        name = command_of(module=main.__module__)
        command = [sys.executable, "-m", *(("dali.cli", name) if name else (main.__module__,))]
        running = _Running([*command, *argv] if in_process else list(sys.argv))
        token = _RUNNING.set(running)
        try:
            return main(argv)
        finally:
            _RUNNING.reset(token)
            for stage in reversed(running.stages):
                stage.close()

    return wrapper


class IntegrityError(StageStateError):
    """A stage's output differs from the sha256 its manifest records."""


def require_finished(
    path: str | Path, what: str, flag_name: str, outputs: tuple[str, ...] = (), allow_modified: bool = False
) -> Path:
    """An upstream stage folder with its manifest, or a clear error naming the flag that points at it; each of
    ``outputs`` is checked against the sha256 the manifest records (a changed byte is an :class:`IntegrityError`
    naming the file, unless ``allow_modified``, which only warns)."""
    path = Path(path)
    folder.recover_if_idle(path)  # an --overwrite of it killed half-way: the run that is whole comes back
    if not (path / MANIFEST).is_file():
        state = "does not exist" if not path.exists() else f"has no {MANIFEST} (unfinished or not a stage folder)"
        raise StageStateError(f"{flag_name}: the {what} folder '{path}' {state}")
    recorded = read_manifest(path)["outputs"]
    for name in outputs:
        if name not in recorded or not (path / name).is_file():
            raise StageStateError(f"{flag_name}: the {what} folder '{path}' has no recorded output '{name}'")
        actual = file_sha256(path / name)
        if actual == recorded[name]:
            continue
        message = (
            f"{flag_name}: '{path / name}' is not the file its stage wrote (sha256 {actual[:12]}..., its manifest "
            f"records {str(recorded[name])[:12]}...): it was changed or damaged since"
        )
        if not allow_modified:
            raise IntegrityError(message + "; pass --allow-modified to use it anyway")
        log.warning("%s; used anyway (--allow-modified)", message)
    return path


def read_manifest(path: str | Path) -> dict[str, Any]:
    """A stage folder's manifest, checked to be a JSON object with the fields every manifest has."""
    file = Path(path) / MANIFEST
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise StageStateError(f"'{file}' is not a readable manifest ({type(error).__name__}: {error})") from None
    if not isinstance(manifest, dict):
        raise StageStateError(f"'{file}' is not a manifest: it holds a JSON {type(manifest).__name__}, not an object")
    for key, kind in (("stage", str), ("outputs", dict), ("inputs", dict), ("metrics", dict)):
        if not isinstance(manifest.get(key, kind()), kind):
            raise StageStateError(f"'{file}' is not a manifest: its '{key}' is not a JSON {kind.__name__}")
    manifest.setdefault("outputs", {})
    return manifest
