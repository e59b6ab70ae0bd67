"""A trained model as a folder to share: what ``dali export`` writes and ``AudioCaptioner.from_pretrained`` reads.

    config.json        what the folder holds and needs: the format, the encoder family, the projector, the prefix,
                       the prompt, the window, the LLaVA (a hub id or a path, with its fingerprint; never copied),
                       and the sha256 of the weights
    model.safetensors  the trained parts only, each under its name (``audio_encoder.``, ``prefix.``,
                       ``projector.``), with each part's own file metadata
    README.md          the model card (the Hub's YAML header; scores, data, commands; licence and intended use)

A name that is not a local folder is looked up on the Hub through huggingface_hub (its cache first; offline with
``HF_HUB_OFFLINE=1``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dali import __version__
from dali.errors import DaliError, shown
from dali.files import file_sha256

FORMAT = 1  # the folder layout this dali writes and reads
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "README.md"
PARTS = ("audio_encoder", "prefix", "projector")
FIELDS = frozenset(
    {"dali_model_format", "dali_version", "llava", "llava_fingerprint", "conv_mode", "projector", "prefix"}
    | {"audio_encoder", "window_s", "target_frames", "files", "run"}
)
MAX_CONFIG_BYTES = 1 << 20  # a few kB


class ModelFolderError(DaliError, ValueError):
    """A model folder (or name) that cannot be read: not found, tampered with, or from a newer dali."""


def resolve(name_or_folder: str | Path) -> Path:
    """A local model folder, else a Hub model by name through huggingface_hub (its cache, or a download)."""
    folder = Path(name_or_folder)
    if (folder / CONFIG_FILE).is_file():
        return folder
    if folder.exists():
        raise ModelFolderError(f"--model: '{folder}' is not a dali model folder (it has no {CONFIG_FILE})")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(
            snapshot_download(repo_id=str(name_or_folder), allow_patterns=[CONFIG_FILE, WEIGHTS_FILE, CARD_FILE])
        )
    except HFValidationError:
        raise ModelFolderError(f"--model: '{name_or_folder}' is neither a folder nor a Hub model name") from None
    except Exception as error:  # huggingface_hub raises a family of errors: offline, not found, no access
        raise ModelFolderError(
            f"--model: '{name_or_folder}' is not a local folder and the Hub did not give it "
            f"({type(error).__name__}: {shown(str(error).splitlines()[0] if str(error) else '', 200)})"
        ) from None


def read_config(folder: Path) -> dict[str, Any]:
    """The folder's config, checked: this dali's format, only the fields it knows, the weights' sha256 listed."""
    path = folder / CONFIG_FILE
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ValueError(f"over {MAX_CONFIG_BYTES} bytes")
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelFolderError(f"'{path}' is unreadable ({shown(str(error), 200)})") from None
    if not isinstance(config, dict) or "dali_model_format" not in config:
        raise ModelFolderError(f"'{path}' is not a dali model config (no dali_model_format)")
    if config["dali_model_format"] != FORMAT:
        raise ModelFolderError(
            f"'{path}' is a dali model folder of format {shown(config['dali_model_format'])}, made by another dali "
            f"(version {shown(config.get('dali_version'))}); this one reads format {FORMAT}: use that dali"
        )
    unknown = sorted(set(config) - FIELDS)
    if unknown:
        raise ModelFolderError(f"'{path}' has fields this dali does not know: {shown(unknown)}; use a newer dali")
    if not isinstance(config.get("files"), dict) or not isinstance(config["files"].get(WEIGHTS_FILE), str):
        raise ModelFolderError(f"'{path}' lists no sha256 for {WEIGHTS_FILE}")
    return config


def read_parts(folder: Path, config: dict[str, Any]) -> dict[str, tuple[dict, dict[str, str]]]:
    """Each trained part's tensors and metadata, from weights whose sha256 is the config's."""
    from dali.models.checkpoints import read_state_dict

    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise ModelFolderError(f"'{path}' does not exist")
    actual = file_sha256(path)
    if actual != config["files"][WEIGHTS_FILE]:
        raise ModelFolderError(
            f"'{path}' is not the file this model was exported with (sha256 {actual[:12]}..., its config records "
            f"{config['files'][WEIGHTS_FILE][:12]}...): it was changed or damaged since"
        )
    state, metadata = read_state_dict(path)
    parts = {}
    for part in PARTS:
        mine = f"{part}."
        tensors = {key[len(mine) :]: value for key, value in state.items() if key.startswith(mine)}
        if tensors:
            parts[part] = tensors, {k[len(mine) :]: v for k, v in metadata.items() if k.startswith(mine)}
    unknown = sorted(key for key in state if not key.startswith(tuple(f"{part}." for part in PARTS)))
    if unknown or "audio_encoder" not in parts:
        raise ModelFolderError(f"'{path}' holds no audio encoder, or tensors of no known part: {shown(unknown)}")
    return parts


# -- writing: dali export ------------------------------------------------------------------------------------------
def export(
    run,
    out: Path,
    *,
    projector: str | None = None,
    use_prefix: bool | None = None,
    llava: str | None = None,
    overwrite: bool = False,
    allow_modified: bool = False,
) -> dict:
    """Write ``out`` (absent, or with ``overwrite`` a model folder of ours) from a finished run: what captioning with
    ``projector`` (default: the distilled one when the run has it) and the prefix (default: with LLaVA's projector)
    loads, each part checked against its stage's manifest; written beside ``out`` first and renamed into place, so
    ``out`` is never half-written. Returns the config."""
    from dali.artifacts import ENCODER_FILE, PREFIX_FILE, PROJECTOR_FILE
    from dali.models.audio_encoders import encoder_from_state
    from dali.models.checkpoints import read_state_dict
    from dali.run import captioning_stages
    from dali.runs import model_fingerprint, require_finished
    from dali.stage_table import ALIGN, DISTILL, PREFIX

    check_destination(out, run.folder, overwrite)
    projector = projector or run.default_projector()
    use_prefix = projector == "llava" and run.finished(PREFIX) if use_prefix is None else use_prefix
    parts = {
        ALIGN: ("audio_encoder", ENCODER_FILE),
        PREFIX: ("prefix", PREFIX_FILE),
        DISTILL: ("projector", PROJECTOR_FILE),
    }
    uses = captioning_stages(projector, use_prefix)
    tensors, metadata, read = {}, {}, {}
    for row in uses:
        name, file = parts[row]
        folder = require_finished(run.stage(row), row.name, run.flag(row), (file,), allow_modified)
        state, meta = read[row] = read_state_dict(folder / file)
        tensors |= {f"{name}.{key}": value.contiguous() for key, value in state.items()}
        metadata |= {f"{name}.{key}": value for key, value in meta.items()}
    encoder = encoder_from_state(
        *read[ALIGN], str(run.stage(ALIGN) / ENCODER_FILE)
    )  # what it is, from the tensors read
    source = run.llava(llava, uses, allow_modified)
    local = Path(source).is_dir()
    config = {
        "dali_model_format": FORMAT,
        "dali_version": __version__,
        "llava": str(Path(source).resolve()) if local else source,
        "llava_fingerprint": model_fingerprint(Path(source)) if local else None,
        "conv_mode": run.conv_mode(uses),
        "projector": projector,
        "prefix": use_prefix,
        "audio_encoder": encoder.describe(),
        "target_frames": encoder.target_frames,
        "window_s": encoder.target_frames / 100,
        "run": run.folder.name,
    }
    _write_folder(out, tensors, metadata, config, lambda folder: model_card(run, config))
    return config


def _write_folder(out: Path, tensors: dict, metadata: dict, config: dict, card) -> None:
    """The folder written under a temporary name beside ``out``, then put in its place (an old export of ours is
    replaced only once the new one is whole)."""
    import os
    import secrets
    import shutil

    from safetensors.torch import save_file

    from dali.files import atomic_write, atomic_write_json, atomic_write_text

    work = out.parent / f".{out.name}.{secrets.token_hex(4)}.tmp"
    work.mkdir(parents=True)
    try:
        atomic_write(work / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
        config["files"] = {WEIGHTS_FILE: file_sha256(work / WEIGHTS_FILE)}
        atomic_write_json(work / CONFIG_FILE, config)
        atomic_write_text(work / CARD_FILE, card(work))
        old = out.parent / f".{out.name}.{secrets.token_hex(4)}.old"
        if out.exists():
            os.replace(out, old)
        os.replace(work, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def check_destination(out: Path, run_folder: Path, overwrite: bool) -> None:
    """``out`` must lie outside the run, and be absent or (``overwrite``) a model folder of ours."""
    resolved, run = out.resolve(), run_folder.resolve()
    if resolved == run or run in resolved.parents:
        raise ModelFolderError(f"OUT '{out}' is inside the run folder '{run_folder}': export never writes into a run")
    if not out.exists():
        return
    ours = out.is_dir() and not out.is_symlink() and (out / CONFIG_FILE).is_file()
    ours = ours and set(p.name for p in out.iterdir()) <= {CONFIG_FILE, WEIGHTS_FILE, CARD_FILE}
    if not ours:
        raise ModelFolderError(f"OUT '{out}' exists and is not a model folder dali exported: choose another OUT")
    read_config(out)  # ours and readable: replaced only with --overwrite
    if not overwrite:
        raise ModelFolderError(f"OUT '{out}' holds an exported model; pass --overwrite to replace it")


# -- the model card --------------------------------------------------------------------------------------------
def model_card(run, config: dict) -> str:
    """README.md with the Hub's YAML header: what the model is, its scores (the run's infer stages), the data and
    commands that made it (the trained stages' manifests), and fields for licence and intended use."""
    family = config["audio_encoder"]["family"]
    header = ["---", "library_name: dali", "license: other", "tags:", "- audio-captioning", "- zero-shot", "- llava"]
    if not config["llava_fingerprint"]:
        header.append(f"base_model: {config['llava']}")
    projector = "the distilled projector" if config["projector"] == "distilled" else "LLaVA's projector"
    projector += " and the learned prefix" if config["prefix"] else ""
    lines = [
        *header,
        "---",
        "",
        f"# DALI audio captioner: `{config['run']}`",
        "",
        f"An audio encoder ({family}) aligned with LLaVA's CLIP tokens (An Eye for an Ear, Malard et al., NeurIPS "
        f"2024), with {projector}; prompt `{config['conv_mode']}`, one caption per {config['window_s']:.2f} s "
        f"window. LLaVA is not included: `{config['llava']}`"
        + (
            " (a local folder: elsewhere, pass the same model as `llava=` or `--llava`; its fingerprint is checked)."
            if config["llava_fingerprint"]
            else "."
        ),
        "",
        "```python",
        "from dali import AudioCaptioner",
        "",
        'captioner = AudioCaptioner.from_pretrained("THIS_FOLDER_OR_NAME")',
        'captioner.caption("clip.wav")  # [(start_s, end_s, caption), ...]',
        "```",
        "",
        *_scores_section(run),
        *_provenance_section(run),
        "## Licence",
        "",
        "To fill in: the licences of LLaVA, of the audio encoder's initial weights and of the training data apply.",
        "",
        "## Intended use",
        "",
        "To fill in. The captions come from a captioner that never saw an audio caption: check them before use.",
    ]
    return "\n".join(lines) + "\n"


def _scores_section(run) -> list[str]:
    from dali.files import read_plain_yaml
    from dali.runs import CONFIG, MANIFEST, read_manifest
    from dali.stage_table import INFER

    rows = []
    for folder in sorted(run.folder.glob(f"{INFER.folder}_*")):
        if (folder / MANIFEST).is_file():
            scores = read_manifest(folder).get("metrics", {}).get("scores") or {}
            made = read_plain_yaml(folder / CONFIG) or {}
            how = [made.get(key) for key in ("modality", "projector", "use_prefix", "strategy", "seed")]
            cells = [f"`{folder.name}`", *map(str, how)]
            cells += [f"{scores[m]:.4f}" if m in scores else "n/a" for m in ("bleu_4", "meteor", "cider_d")]
            rows.append("| " + " | ".join(cells) + " |")
    if not rows:
        return ["## Scores", "", "The run holds no finished `dali infer` folder.", ""]
    head = "| infer folder | modality | projector | prefix | decoding | seed | bleu_4 | meteor | cider_d |"
    return ["## Scores (the run's `dali infer` folders)", "", head, "|" + "---|" * 9, *rows, ""]


def _provenance_section(run) -> list[str]:
    from dali.runs import read_manifest
    from dali.stage_table import ALIGN, DISTILL, PREFIX, PSEUDO_LABEL

    lines = ["## How it was made", ""]
    for row in (PREFIX, ALIGN, PSEUDO_LABEL, DISTILL):
        if not run.finished(row):
            continue
        manifest = read_manifest(run.stage(row))
        inputs = manifest.get("inputs", {}).items()
        data = [
            f"`{name}` sha256 {(found.get('sha256') or found['manifest_sha256'])[:16]}"
            for name, found in inputs
            if isinstance(found, dict) and ("sha256" in found or "manifest_sha256" in found)
        ]
        command = " ".join(str(part) for part in manifest.get("command", []))
        made = f"finished {manifest.get('finished', '?')}, commit {str(manifest.get('git_commit'))[:12]}"
        lines += [f"- **{row.command}** ({made}): data {', '.join(data) or 'none by file'}", f"  `{command}`"]
    return [*lines, ""]
