"""Stage configs: small dataclasses that double as the command-line schema.

``parse_config(Config, argv)`` reads an optional ``--config preset.yaml`` (its keys are field names), then
the flags (``--field-name``), which win. Unknown preset keys and bad values fail with a message naming the
key or flag. A config's ``validate()`` checks flag combinations right after parsing.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import types
import typing
from pathlib import Path
from typing import Any, Callable, TypeVar

from dali.errors import DaliError, shown
from dali.files import read_plain_yaml
from dali.limits import BOUNDS, number_problem
from dali.stage_table import command_of

T = TypeVar("T")
# Booleans whose negative means nothing (no preset turns them on): plain switches. Every other boolean keeps its
# --no-... form, since a preset may set it.
SWITCHES = frozenset(
    {"overwrite", "resume", "first_window_only", "reduced", "full", "allow_missing", "allow_modified", "recursive"}
    | {"shards", "filter"}
    | {"list_metric_models"}
)
# Where a flag shows in --help: a command's inputs and settings first, then decoding (fields marked so), then these.
SYSTEM_FLAGS = frozenset(
    {"run", "expe_dir", "out", "overwrite", "resume", "allow_modified", "device", "dtype", "vision_dtype"}
    | {"autocast", "compile"}
    | {"seed", "num_workers", "on_error", "checkpoint_every", "max_non_finite_steps", "emd_workers"}
    | {"gradient_checkpointing", "cache_vision_tokens", "cache_audio_features", "cache_audio_tokens"}
)
# The help of the flags that many commands share, written once; a field's own help wins.
COMMON_HELP = {
    "allow_modified": "use a run's trained file even when it differs from the sha256 its manifest records",
    "run": "the run's name: its stages write under <expe-dir>/<run>/",
    "expe_dir": "the folder of all runs",
    "data_root": "folder the list's relative paths start from (default: the list's own folder)",
    "out": "write the stage here instead of <expe-dir>/<run>/<stage>",
    "overwrite": "replace a finished stage folder (only one a stage made; restored if the new run fails)",
    "resume": "continue an interrupted run from its checkpoint, with the same settings",
    "device": "auto (this process's GPU, else the CPU), cpu, cuda or cuda:N",
    "dtype": "precision of LLaVA and of every captioning part",
    "seed": "seed of every random choice (shuffles, initialisation, sampling)",
    "num_workers": "data-loading processes per process of the stage (0: in the main process; default: this "
    "node's cores shared among the stage's processes, at most 16)",
    "on_error": "a clip that cannot be read: skip it (listed in skipped.jsonl) or stop the run",
    "frame_index": "which of the 10 frames per clip (frame_<k>) is the clip's image",
    "batch_size": "clips per step (per process under torchrun)",
    "epochs": "passes over the training data",
    "lr": "learning rate",
    "weight_decay": "weight decay of the optimiser",
    "warmup_ratio": "share of the steps spent warming the learning rate up",
    "max_grad_norm": "gradients are clipped to this norm",
    "checkpoint_every": "steps between resumable checkpoints",
    "max_non_finite_steps": "NaN/inf steps skipped before the run stops",
    "strategy": "greedy, beam search or seeded sampling",
    "temperature": "sampling temperature (sample only)",
    "num_beams": "beams (beam only)",
    "max_new_tokens": "longest caption, in tokens",
    "modality": "what the captioner sees: the audio tokens, audio and the frame's image tokens, or the frame only",
    "sbert": "compute SBERT-sim (all-MiniLM-L6-v2)",
}


class ConfigError(DaliError, ValueError):
    """A flag or preset value is wrong; the message names it."""


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def require_at_least(config: Any, minimum: float, *names: str) -> None:
    """A ConfigError naming the first flag among ``names`` whose value is below ``minimum`` (for ``validate()``)."""
    for name in names:
        if getattr(config, name) < minimum:
            raise ConfigError(f"{flag(name)} must be >= {minimum}, got {getattr(config, name)}")


def bounds_of(config_class: type, name: str) -> tuple[float, float] | None:
    """The bounds a field of a command's config declares (its own, else :data:`dali.limits.BOUNDS`'), or None."""
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    return fields[name].metadata.get("bounds") or BOUNDS.get(name)


def check_bounds(config: Any) -> None:
    """Every number of a parsed config (a sequence's items too) is finite and within its declared bounds."""
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        for number in value if isinstance(value, tuple) else (value,):
            if isinstance(number, bool) or not isinstance(number, (int, float)):
                continue
            problem = number_problem(item.name, number, bounds_of(type(config), item.name))
            if problem:
                raise ConfigError(f"{flag(item.name)} {problem}")


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """(inner type, optional?) of an annotation such as ``int | None``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return args[0], True
    return annotation, False


def _converter(annotation: Any, optional: bool):
    def convert(text: str):
        if optional and text.lower() in ("none", "null", ""):
            return None
        if annotation is bool:
            lowered = text.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise argparse.ArgumentTypeError(f"expected true/false, got '{text}'")
        return annotation(text)

    convert.__name__ = getattr(annotation, "__name__", "value")
    return convert


def _coerce(name: str, annotation: Any, value: Any, source: str) -> Any:
    base, optional = _base_type(annotation)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{source}: '{name}' cannot be null")
    origin = typing.get_origin(base)
    if origin in (tuple, list):
        (item_type, *_) = typing.get_args(base) or (str,)
        if not isinstance(value, (list, tuple)):
            value = [value]
        return tuple(_coerce(name, item_type, item, source) for item in value)
    try:
        if base is bool and not isinstance(value, bool):
            return _converter(bool, False)(str(value))
        if base is Path:
            return str(value)
        return base(value)
    except (TypeError, ValueError, argparse.ArgumentTypeError) as error:
        kind = getattr(base, "__name__", base)
        raise ConfigError(f"{source}: '{name}' = {shown(value)} is not a valid {kind}: {shown(str(error), 200)}")


def load_preset(cls: type[T], path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config: preset '{path}' does not exist")
    try:
        data = read_plain_yaml(path) or {}
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ConfigError(f"--config: preset {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config: preset '{path}' must be a mapping of field names to values")
    fields = {field.name: field for field in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"--config: preset '{path}' has unknown keys {unknown}; known keys: {sorted(fields)}")
    values = {key: _coerce(key, hints[key], value, f"preset '{path}'") for key, value in data.items()}
    values = {key: _renamed(fields[key], value) for key, value in values.items()}
    for key, value in values.items():  # a preset's value must pass what the flag would
        choices = fields[key].metadata.get("choices")
        if choices and value is not None and value not in choices:
            raise ConfigError(f"--config: preset '{path}': '{key}' = {shown(value)} is not one of {list(choices)}")
    return values


def command_parser(cls: type, description: str | None) -> argparse.ArgumentParser:
    """The parser of the ``dali`` command whose config ``cls`` is: named as the command (by the command table),
    its description (a docstring, laid out as written) without reStructuredText marks."""
    command = command_of(config=cls.__name__)
    text = inspect.cleandoc(description or "").replace("``", "").replace(":class:", "").replace(":func:", "")
    formatter = argparse.RawDescriptionHelpFormatter
    prog = f"dali {command}" if command else None
    return argparse.ArgumentParser(prog=prog, description=text, formatter_class=formatter, allow_abbrev=False)


def build_parser(cls: type, description: str = "", defaults: dict[str, Any] | None = None) -> argparse.ArgumentParser:
    """Flags from a config's fields: help with defaults, required where neither a default nor the preset gives one,
    plain switches for :data:`SWITCHES`."""
    parser = command_parser(cls, description or cls.__doc__)
    parser.add_argument("--config", help="YAML preset whose keys are this stage's field names; flags win")
    groups = {
        "settings": parser.add_argument_group("inputs and settings"),
        "decoding": parser.add_argument_group("decoding"),
        "system": parser.add_argument_group("run folder and system"),
    }
    hints = typing.get_type_hints(cls)
    defaults = defaults or {}
    for field in dataclasses.fields(cls):
        base, optional = _base_type(hints[field.name])
        default = defaults.get(field.name, field.default if field.default is not dataclasses.MISSING else None)
        if field.default is dataclasses.MISSING and field.default_factory is not dataclasses.MISSING:  # type: ignore
            default = defaults.get(field.name, field.default_factory())  # type: ignore
        required = field.default is dataclasses.MISSING and field.name not in defaults and not optional
        positional = field.metadata.get("positional")
        kwargs: dict[str, Any] = {"default": default, "help": _help(field, default, required and not positional)}
        if typing.get_origin(base) in (tuple, list):
            (item_type, *_) = typing.get_args(base) or (str,)
            kwargs |= {"nargs": "*", "type": _converter(item_type, False)}
        elif base is bool:
            switch = field.name in SWITCHES and default is False
            kwargs["action"] = "store_true" if switch else argparse.BooleanOptionalAction
        else:
            kwargs |= {"type": _converter(base, optional), "choices": field.metadata.get("choices")}
            if field.metadata.get("renamed"):  # an old spelling becomes the name now before the choices are checked
                kwargs["type"] = functools.partial(_renamed_text, field, kwargs["type"])
        if positional:
            groups["settings"].add_argument(field.name, **kwargs)
            continue
        group = "system" if field.name in SYSTEM_FLAGS else field.metadata.get("group", "settings")
        names = [flag(field.name), *([field.metadata["short"]] if field.metadata.get("short") else [])]
        groups[group].add_argument(*names, dest=field.name, required=required, **kwargs)
    return parser


def _help(field: dataclasses.Field, default: Any, required: bool) -> str:
    text = field.metadata.get("help") or COMMON_HELP.get(field.name, "")
    if required:
        return (text + " " if text else "") + "(required)"
    if default is None or default is False or default == ():
        return text
    shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
    return (text + " " if text else "") + f"(default: {shown})".replace("%", "%%")


def parse_config(cls: type[T], argv: list[str] | None = None, description: str = "") -> T:
    """Preset (``--config``) < flags. Fields without a default must come from one of them."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    preset = load_preset(cls, known.config) if known.config else {}
    parser = build_parser(cls, description, preset)
    namespace = vars(parser.parse_args(argv))
    namespace.pop("config")
    hints = typing.get_type_hints(cls)
    values = {}
    for field in dataclasses.fields(cls):
        value = namespace[field.name]
        if value is None and field.default is dataclasses.MISSING and not _base_type(hints[field.name])[1]:
            raise ConfigError(f"{flag(field.name)} is required (give it as a flag or in the --config preset)")
        if isinstance(value, list):
            value = tuple(value)
        values[field.name] = value
    config = cls(**values)
    check_bounds(config)
    validate = getattr(config, "validate", None)
    if validate is not None:
        validate()
    return config


def config_to_dict(config: Any) -> dict[str, Any]:
    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(item) for item in value]
        if isinstance(value, Path):
            return str(value)
        return value

    return {field.name: plain(getattr(config, field.name)) for field in dataclasses.fields(config)}


def _renamed(field: dataclasses.Field, value: Any) -> Any:
    """A choice given by its old name, as its name now."""
    renamed = field.metadata.get("renamed") or {}
    return renamed.get(value, value) if isinstance(value, str) else value


def _renamed_text(field: dataclasses.Field, convert: Callable[[str], Any], text: str) -> Any:
    return _renamed(field, convert(text))


def field(
    default: Any = dataclasses.MISSING,
    help: str = "",
    choices: tuple | None = None,
    positional: bool = False,
    group: str = "settings",
    bounds: tuple[float, float] | None = None,
    renamed: dict[str, str] | None = None,
    short: str | None = None,
) -> Any:
    """A dataclass field with CLI help (and choices); ``positional`` for a value (or a sequence) given without a flag;
    ``group="decoding"`` lists it under decoding in --help; ``bounds`` (inclusive) in place of :data:`BOUNDS`';
    ``renamed``: a choice's old spelling -> its name now (the old one is still taken, as the new); ``short``: a
    one-letter spelling too."""
    metadata = {"help": help, "positional": positional, "group": group, "bounds": bounds, "renamed": renamed or {}}
    metadata["short"] = short  # a one-letter spelling beside the flag (``-r``)
    if choices:
        metadata["choices"] = choices
    if isinstance(default, (list, dict, set)):
        raise TypeError("use tuples for sequence defaults")
    return dataclasses.field(default=default, metadata=metadata)


def argv_of(config: Any) -> list[str]:
    """The flags that make ``config`` again through :func:`parse_config` (a command that runs another in-process
    builds its config, then hands it over as a command line: the one the run's manifest records)."""
    argv: list[str] = []
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.metadata.get("positional"):
            argv += [str(item) for item in value] if isinstance(value, tuple) else [str(value)]
        elif isinstance(value, bool):
            argv += [flag(field.name)] if value else [] if field.name in SWITCHES else [f"--no-{flag(field.name)[2:]}"]
        elif isinstance(value, tuple):
            argv += [flag(field.name), *map(str, value)]
        elif value is not None:
            argv += [flag(field.name), str(value)]
    return argv
