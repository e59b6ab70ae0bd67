"""``--dtype float8`` (dali.models.float8): refused, with one line naming the flag, wherever it cannot run as float8;
recorded in the manifest; never changed on --resume; and, where torchao is installed, exactly the language model's
linear layers made float8 (run on the CPU by lifting torchao's hardware gate: the wiring, not the speed)."""

import pytest
import torch

from dali.cli import main as dali
from dali.models.float8 import Float8Unavailable, check_float8
from dali.runs import Stage, StageStateError


def test_float8_on_a_cpu_is_one_clear_error_before_anything_loads(pipeline, tmp_path, capsys):
    world, _, run = pipeline
    clips = ["--test-list", str(world / "test.csv"), "--audio-dir", str(world / "audio"), "--limit", "2"]
    out = tmp_path / "infer"
    named = ["--run", run.name, "--expe-dir", str(run.parent)]
    assert dali(["infer", *named, *clips, "--dtype", "float8", "--device", "cpu", "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "Traceback" not in error
    assert "--dtype float8 runs on a GPU with FP8 tensor cores" in error and "device is cpu" in error
    assert not (out / "manifest.json").exists()
    audio = tmp_path / "a.wav"
    audio.write_bytes((world / "audio" / "test00000.wav").read_bytes())
    assert dali(["caption", "--run", str(run), str(audio), "--dtype", "float8", "--device", "cpu"]) == 2
    assert "--dtype float8 runs on a GPU" in capsys.readouterr().err


def test_float8_on_a_gpu_without_fp8_tensor_cores_names_the_card(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(Float8Unavailable, match="NVIDIA A100-SXM4-80GB is 8.0: use --dtype bfloat16"):
        check_float8(torch.device("cuda", 0))


@pytest.mark.parametrize("command", ["prefix-tune", "distill", "align"])
def test_the_training_stages_do_not_take_float8(command, capsys):
    flag = "--vision-dtype" if command == "align" else "--dtype"
    with pytest.raises(SystemExit) as stopped:
        dali([command, flag, "float8"])
    assert stopped.value.code == 2 and "invalid choice: 'float8'" in capsys.readouterr().err


def test_resume_refuses_a_change_of_precision(tmp_path):
    """As for any decoding setting: captions made in one precision are not continued in another."""
    stage = Stage(tmp_path / "infer_audio", "infer")
    stage.save_config({"dtype": "bfloat16", "temperature": 0.2})
    stage.add_setting("precision", "bfloat16")
    stage.close()  # stopped before finishing
    resumed = Stage(tmp_path / "infer_audio", "infer", resume=True)
    with pytest.raises(StageStateError, match="other settings [(]--dtype: 'bfloat16' -> 'float8'[)]"):
        resumed.save_config({"dtype": "float8", "temperature": 0.2})
    resumed.close()
    resumed = Stage(tmp_path / "infer_audio", "infer", resume=True)
    resumed.save_config({"dtype": "bfloat16", "temperature": 0.2})
    with pytest.raises(StageStateError, match="--precision 'float8' is not the input"):
        resumed.add_setting("precision", "float8")
    resumed.close()


def test_the_manifest_records_the_precision_that_ran(pipeline, tmp_path):
    from dali.runs import read_manifest
    from dali.stages import infer

    world, _, run = pipeline
    clips = ["--test-list", str(world / "test.csv"), "--audio-dir", str(world / "audio"), "--limit", "2"]
    out = tmp_path / "infer"
    flags = ["--run", run.name, "--expe-dir", str(run.parent), *clips, "--dtype", "bfloat16", "--no-sbert"]
    flags += ["--projector", "llava", "--use-prefix"]
    assert infer.main([*flags, "--max-new-tokens", "4", "--out", str(out)]) == 0
    assert read_manifest(out)["inputs"]["precision"] == {"value": "bfloat16"}


def test_float8_makes_exactly_the_language_models_linear_layers_float8(synthetic, monkeypatch):
    """On the CPU with torchao's hardware gate lifted: the decoder's projections become float8 tensors; the LM head,
    the embeddings, the norms, the projector and the vision tower stay bfloat16; captions still come out, and the
    first token's logits stay near bfloat16's."""
    pytest.importorskip("torchao", reason="torchao is the GPU machines' (requirements: not pinned for the CPU)")
    import torchao.quantization.quant_api as quant_api

    from dali.captioning import load_captioner
    from dali.models.decoding import DecodingOptions
    from dali.models.float8 import float8_layers, quantize_float8

    monkeypatch.setattr(quant_api, "_check_hardware_support", lambda *args, **kwargs: None)
    _, llava = synthetic
    reference = load_captioner(str(llava), "bfloat16", "cpu", "v1")
    captioner = load_captioner(str(llava), "bfloat16", "cpu", "v1")
    language_model = captioner.llava.model.language_model
    names = float8_layers(language_model)
    assert quantize_float8(language_model) == len(names) == 7 * len(language_model.layers)  # q k v o gate up down
    modules = dict(language_model.named_modules())
    assert all(type(modules[name].weight) is not torch.nn.Parameter for name in names)
    kept = [captioner.llava.lm_head, captioner.llava.get_input_embeddings(), captioner.projector]
    kept += [captioner.llava.model.vision_tower]
    assert all(type(p) is torch.nn.Parameter and p.dtype == torch.bfloat16 for m in kept for p in m.parameters())
    assert captioner.precision == "float8" and reference.precision == "bfloat16"
    torch.manual_seed(0)
    block = torch.randn(3, 8, captioner.hidden_size, dtype=torch.bfloat16)
    shared, rows = captioner.prompt_parts(block)
    logits = [c.llava(inputs_embeds=torch.cat([shared.expand(3, -1, -1), rows], 1)).logits[:, -1].float()
              for c in (reference, captioner)]  # fmt: skip
    assert (logits[1] - logits[0]).norm() / logits[0].norm() < 0.1
    captions = captioner.generate(block, DecodingOptions(strategy="greedy", max_new_tokens=6))
    assert len(captions) == 3 and all(captions)


@pytest.mark.gpu
def test_float8_greedy_captions_match_bfloat16_on_most_clips(pipeline):
    """On a GPU with FP8 tensor cores, through the engine (compiled prefill, CUDA-graph decode): the world's
    captioner, audio rows with LLaVA's projector and the prefix, greedy. The share is printed, not tuned."""
    pytest.importorskip("torchao")
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs FP8 tensor cores (compute capability 8.9+)")
    from dali import AudioCaptioner
    from dali.models.decoding import DecodingOptions

    world, _, run = pipeline
    clips = sorted((world / "audio").glob("test*.wav"))[:32]
    greedy = DecodingOptions(strategy="greedy", max_new_tokens=24)
    captions = {}
    for dtype in ("bfloat16", "float8"):
        captioner = AudioCaptioner.from_run(
            run, projector="llava", use_prefix=True, decoding=greedy, dtype=dtype, device="cuda"
        )
        assert captioner.describe()["dtype"] == dtype
        captions[dtype] = [captioner.caption(clip, first_window_only=True)[0][2] for clip in clips]
    same = sum(a == b for a, b in zip(captions["bfloat16"], captions["float8"])) / len(clips)
    print(f"float8 greedy captions equal to bfloat16's: {same:.2f} of {len(clips)} clips")
    assert same > 0.5
