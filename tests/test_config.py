import dataclasses

import pytest

from dali.config import ConfigError, field, parse_config


@dataclasses.dataclass
class Example:
    """An example stage config."""

    name: str = field(help="required")
    epochs: int = field(3)
    rate: float | None = field(None)
    flag: bool = field(False)
    weights: tuple[float, ...] = field((1.0, 2.0))
    mode: str = field("a", choices=("a", "b"))

    def validate(self):
        if self.epochs < 0:
            raise ConfigError("--epochs must be >= 0")


def test_flags_win_over_preset(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("name: x\nepochs: 5\nweights: [3, 4]\nflag: true\n")
    config = parse_config(Example, ["--config", str(preset), "--epochs", "7"])
    assert config == Example(name="x", epochs=7, weights=(3.0, 4.0), flag=True)
    assert parse_config(Example, ["--config", str(preset), "--no-flag", "--weights", "9"]).weights == (9.0,)
    assert parse_config(Example, ["--name", "y", "--rate", "none"]).rate is None


def test_errors_name_the_key_or_flag(tmp_path, capsys):
    preset = tmp_path / "p.yaml"
    preset.write_text("name: x\nepochz: 5\n")
    with pytest.raises(ConfigError, match="epochz"):
        parse_config(Example, ["--config", str(preset)])
    with pytest.raises(ConfigError, match="--name is required"):
        parse_config(Example, [])
    with pytest.raises(ConfigError, match="--epochs must be"):
        parse_config(Example, ["--name", "x", "--epochs", "-1"])
    with pytest.raises(ConfigError, match="does not exist"):
        parse_config(Example, ["--config", str(tmp_path / "missing.yaml")])
    with pytest.raises(SystemExit):
        parse_config(Example, ["--name", "x", "--mode", "c"])
    assert "--mode" in capsys.readouterr().err
    preset.write_text("name: x\nepochs: many\n")
    with pytest.raises(ConfigError, match="epochs"):
        parse_config(Example, ["--config", str(preset)])


def test_paper_presets_and_the_config_defaults_agree():
    """Every hyper-parameter in configs/paper equals the dataclass default that the help calls the paper's. The
    exceptions are where the data and weights live, and the dtype: defaults are float32 so that every command runs
    on a CPU, the presets are bfloat16 as the original ran."""
    import dataclasses
    from pathlib import Path

    import yaml

    from dali.stages import align, distill, infer, prefix_tune, pseudo_label

    local = {
        "llava",
        "train_list",
        "val_list",
        "init_encoder",
        "pairs",
        "clips",
        "test_list",
        "audio_dir",
        "frames_dir",
    }
    precision = {"dtype": "bfloat16", "vision_dtype": "bfloat16", "autocast": "bfloat16"}
    configs = {
        "prefix_tuning": prefix_tune.PrefixTuneConfig,
        "alignment": align.AlignConfig,
        "pseudo_labels": pseudo_label.PseudoLabelConfig,
        "distillation": distill.DistillConfig,
        "inference": infer.InferConfig,
    }
    for name, cls in configs.items():
        preset = yaml.safe_load((Path(__file__).parent.parent / "configs" / "paper" / f"{name}.yaml").read_text())
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        for key, value in preset.items():
            if key in local:
                continue
            if key in precision:
                assert value == precision[key], (name, key)
                continue
            default = list(defaults[key]) if isinstance(defaults[key], tuple) else defaults[key]
            assert value == default, f"configs/paper/{name}.yaml: {key} = {value}, default {default}"


@pytest.mark.parametrize(
    "stage, preset", [("align", "alignment"), ("distill", "distillation"), ("prefix_tune", "prefix_tuning")]
)
def test_paper_presets_agree_with_the_defaults_that_claim_to_be_the_papers(stage, preset):
    """These configs' docstrings say "Defaults are the paper's": every setting of configs/paper/<preset>.yaml that
    has a default must equal it. Inputs (the LLaVA id, the data lists) have none or a local one, and precision is the
    machine's choice: float32 by default, bfloat16 in the GPU preset (the docstrings say so)."""
    import dataclasses
    import importlib
    from pathlib import Path

    import yaml

    module = importlib.import_module(f"dali.stages.{stage}")
    cls = next(v for v in vars(module).values() if dataclasses.is_dataclass(v) and v.__module__ == module.__name__)
    assert "Defaults are the paper's" in cls.__doc__
    values = yaml.safe_load((Path(__file__).parent.parent / "configs" / "paper" / f"{preset}.yaml").read_text())
    assert "precision aside" in cls.__doc__
    inputs = {
        "dtype",
        "vision_dtype",
        "llava",
        "train_list",
        "val_list",
        "init_encoder",
        "pairs",
        "pseudo_dir",
        "align_dir",
        "run",
        "expe_dir",
    }
    defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
    mismatched = {
        key: (value, defaults[key])
        for key, value in values.items()
        if key in defaults and key not in inputs and _normalised(defaults[key]) != _normalised(value)
    }
    assert not mismatched, f"configs/paper/{preset}.yaml (left) differs from {cls.__name__}'s defaults: {mismatched}"
    assert set(values) - set(defaults) - inputs <= {f.name for f in dataclasses.fields(cls)}


def _normalised(value):
    return [float(v) for v in value] if isinstance(value, (list, tuple)) else value
