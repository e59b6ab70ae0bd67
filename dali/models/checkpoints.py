"""Reading weight files: safetensors or torch pickles (never executing code), and the error that names the file."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from dali.errors import DaliError


class CheckpointError(DaliError, ValueError):
    """A checkpoint does not fit the model it is loaded into; the message names the file and the keys."""


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and string metadata of a ``.safetensors`` file or a torch pickle (``.pth``/``.bin``/``.pt``).

    Pickles are read with ``weights_only=True``: no code from a checkpoint ever runs.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                return {key: handle.get_tensor(key) for key in handle.keys()}, dict(handle.metadata() or {})
        check_torch_archive(path)
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as error:
        raise CheckpointError(f"checkpoint '{path}' is unreadable ({type(error).__name__}: {error})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise CheckpointError(f"checkpoint '{path}' is not a flat state dict of tensors")
    return state, {}


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a ``.safetensors`` file, from its header alone; ``{}`` for any other file, and for one
    that cannot be read (:func:`read_state_dict` then names what is wrong with it)."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return {}
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception:  # a corrupt header: reported by read_state_dict, with the file's name
        return {}


def strip_prefix(state: dict[str, torch.Tensor], prefix: str = "module.") -> dict[str, torch.Tensor]:
    return {key[len(prefix) :] if key.startswith(prefix) else key: value for key, value in state.items()}


def strict_from_pretrained(model_class, source: str | Path, what: str, **kwargs):
    """``model_class.from_pretrained(source)`` that refuses a folder whose weights do not fit its config (a wrong or
    partial download), listing the missing, unexpected and mis-shaped keys: transformers would only warn, and train
    or caption from random weights."""
    model, info = model_class.from_pretrained(str(source), output_loading_info=True, **kwargs)
    kinds = {"missing keys": "missing_keys", "unexpected keys": "unexpected_keys", "mis-shaped keys": "mismatched_keys"}
    listed = _listed_keys({kind: sorted(map(str, info.get(key) or [])) for kind, key in kinds.items()})
    if listed:
        raise CheckpointError(f"'{source}' does not hold the weights its config describes for {what}: {listed}")
    return model


def _listed_keys(problems: dict[str, list[str]]) -> str:
    """``"missing keys [...]; unexpected keys [...]"``: each kind that has keys, its first ten shown."""
    return "; ".join(f"{kind} {keys[:10]}{' ...' if len(keys) > 10 else ''}" for kind, keys in problems.items() if keys)


def header_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape, from a ``.safetensors`` file's header alone (safetensors bounds the header's size)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except Exception as error:
        raise CheckpointError(f"checkpoint '{path}' is unreadable ({type(error).__name__}: {error})") from None


def check_described_structure(values: dict, source: str) -> None:
    """A model's description (a config as a dict, nested ones included), bounded before anything is built from it,
    even on the meta device: layer counts by :data:`dali.limits.MAX_DESCRIBED_LAYERS`, list lengths and integers by
    their own bounds. A config declaring a million layers would otherwise cost gigabytes of modules to check."""
    from dali.limits import MAX_DESCRIBED_INTEGER, MAX_DESCRIBED_LAYERS, MAX_DESCRIBED_LIST

    if not isinstance(values, dict):
        raise CheckpointError(f"'{source}' describes no model config (a {type(values).__name__}, not an object)")
    for key, value in values.items():
        if isinstance(value, dict):
            check_described_structure(value, source)
            continue
        numbers = value if isinstance(value, list) else [value]
        if isinstance(value, list) and len(value) > MAX_DESCRIBED_LIST:
            raise CheckpointError(f"'{source}' describes '{key}' of {len(value)} items (at most {MAX_DESCRIBED_LIST})")
        for number in numbers:
            if isinstance(number, bool) or not isinstance(number, int):
                continue
            bound = MAX_DESCRIBED_LAYERS if str(key).endswith("layers") else MAX_DESCRIBED_INTEGER
            if abs(number) > bound:
                raise CheckpointError(f"'{source}' describes '{key}' = {number} (at most {bound})")


def check_described_model(described: torch.nn.Module, shapes: dict[str, tuple[int, ...]], source: str) -> None:
    """A model built on the meta device (no memory) from a file's own description, checked against the tensors the
    file's header holds, before the real model is built: a 1 KB description of a 77 GB model is refused here."""
    expected = {key: tuple(value.shape) for key, value in described.state_dict().items()}
    listed = _listed_keys(
        {
            "missing keys": sorted(set(expected) - set(shapes)),
            "unexpected keys": sorted(set(shapes) - set(expected)),
            "mis-shaped keys": sorted(k for k in set(expected) & set(shapes) if expected[k] != shapes[k]),
        }
    )
    if listed:
        raise CheckpointError(f"'{source}' describes a model its tensors do not fit: {listed}")


def check_torch_archive(path: str | Path) -> None:
    """A torch checkpoint is unpickled only when it cannot inflate: torch.save writes a zip archive whose records
    are stored uncompressed, so every record is refused unless stored, and their declared sizes must fit the file
    (a 2 MB DEFLATE record inflated to 2.4 GB). The legacy format is not compressed."""
    import zipfile

    path = Path(path)
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
    except (zipfile.BadZipFile, OSError) as error:
        raise CheckpointError(f"checkpoint '{path}' is unreadable ({error})") from None
    compressed = [record.filename for record in records if record.compress_type != zipfile.ZIP_STORED]
    if compressed:
        raise CheckpointError(f"checkpoint '{path}' has compressed records {compressed[:3]}; torch.save writes none")
    if sum(record.file_size for record in records) > path.stat().st_size:
        raise CheckpointError(f"checkpoint '{path}' declares records larger than the file")


def check_folder_fits(model_class, folder: str | Path, what: str, max_parameters: float) -> None:
    """Before ``from_pretrained`` allocates what a folder's ``config.json`` describes: that model (``model_class`` may
    be ``AutoModel``), built on the meta device (no memory), may have at most ``max_parameters`` and no more
    parameters than the folder's weight files hold (elements in safetensors headers; for other files, one per byte at
    most)."""
    from transformers import AutoConfig

    folder = Path(folder)
    auto = getattr(model_class, "config_class", None) is None  # AutoModel: the config names the architecture
    config = (AutoConfig if auto else model_class.config_class).from_pretrained(str(folder))
    check_described_structure(config.to_dict(), f"{folder}/config.json")
    with torch.device("meta"):
        described = model_class.from_config(config) if auto else model_class(config)
    count = sum(parameter.numel() for parameter in described.parameters())
    held = 0
    for file in folder.iterdir():
        if file.suffix == ".safetensors":
            held += sum(math.prod(shape) for shape in header_shapes(file).values())
        elif file.suffix in (".bin", ".pt", ".pth"):
            held += file.stat().st_size
    if count > max_parameters or count > held * 1.05 + 100_000:
        raise CheckpointError(
            f"'{folder}/config.json' describes {what} of {count:,} parameters; its weight files hold {held:,} "
            f"(and dali takes at most {int(max_parameters):,}): a wrong config or a partial download"
        )
