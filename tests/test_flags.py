import dataclasses

import pytest

from dali.flags import ConfigError, field, parse_config


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
    (tmp_path / "named.yaml").write_text("name: y\n")
    with pytest.raises(ConfigError, match="epochz"):
        parse_config(Example, ["--config", str(preset)])
    with pytest.raises(SystemExit):  # required in argparse itself: the usage line, then the message
        parse_config(Example, [])
    assert "the following arguments are required: --name" in capsys.readouterr().err
    assert parse_config(Example, ["--config", str(preset.with_name("named.yaml"))]).name == "y"  # or from a preset
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

    from dali import command_configs as c

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
        "prefix_tuning": c.PrefixTuneConfig,
        "alignment": c.AlignConfig,
        "pseudo_labels": c.PseudoLabelConfig,
        "distillation": c.DistillConfig,
        "inference": c.InferConfig,
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


def test_a_renamed_choice_keeps_its_old_spelling(tmp_path):
    """``--projector original`` meant LLaVA's own projector; it is ``llava`` now, and the old word still works, as a
    flag and in a preset, and means the same."""
    from dali.command_configs import CaptionConfig, InferConfig

    required = ["--llava", "x", "--test-list", "t.csv"]
    assert parse_config(InferConfig, [*required, "--projector", "original"]).projector == "llava"
    assert parse_config(InferConfig, [*required, "--projector", "llava"]).projector == "llava"
    preset = tmp_path / "p.yaml"
    preset.write_text("projector: original\n")
    assert parse_config(InferConfig, [*required, "--config", str(preset)]).projector == "llava"
    assert parse_config(CaptionConfig, ["--run", "r", "a.wav", "--projector", "original"]).projector == "llava"
    with pytest.raises(SystemExit):
        parse_config(InferConfig, [*required, "--projector", "mine"])
