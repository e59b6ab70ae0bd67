import numpy as np
import pytest
import soundfile
import torch


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def write_wav(tmp_path):
    """Write a test clip: a chirp plus noise at the given rate, length and channels."""

    def write(name="clip.wav", rate=16_000, seconds=1.0, channels=1, subtype=None):
        t = np.arange(int(rate * seconds)) / rate
        tone = 0.3 * np.sin(2 * np.pi * (300 + 400 * t) * t) + 0.01 * np.random.default_rng(1).standard_normal(t.size)
        data = np.stack([tone * (c + 1) / channels for c in range(channels)], axis=1) if channels > 1 else tone
        path = tmp_path / name
        soundfile.write(str(path), data.astype(np.float32), rate, subtype=subtype)
        return path

    return write


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


CAPTIONS = [
    "a dog barks twice",
    "a bell rings once",
    "wind blows hard",
    "a red ball on the grass",
    "a man speaks and a car passes",
    "water flows in a stream",
    "a cat meows",
    "birds chirp in the trees",
]


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory):
    """A tiny LLaVA-1.5-shaped captioner saved in Hugging Face format (built offline, random weights)."""
    from dali.constants import SYSTEM_PROMPT
    from dali.models.captioner import QUESTION
    from dali.models.tiny_llava import TinyLlavaConfig, build_tiny_llava, save_tiny_llava, train_tokenizer

    tokenizer = train_tokenizer(CAPTIONS * 4 + [SYSTEM_PROMPT, QUESTION, "USER: ASSISTANT:"], vocab_size=160)
    config = TinyLlavaConfig(
        image_size=32,
        patch_size=8,
        vision_hidden=32,
        vision_layers=2,
        vision_heads=2,
        text_hidden=32,
        text_layers=1,
        text_heads=2,
    )
    model = build_tiny_llava(tokenizer, config)
    return save_tiny_llava(model, tokenizer, tmp_path_factory.mktemp("tiny_llava"))


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory):
    """A reduced synthetic world and its tiny captioner, trained enough to write fluent captions (6 epochs; 1 gives
    "a a a ...", on which no stage can show anything): (world folder, captioner folder)."""
    from dali.synthetic.build import CAPTIONER_FOLDER
    from dali.synthetic.captioner import CaptionerTraining, train_captioner
    from dali.synthetic.world import REDUCED, generate_world

    world = generate_world(tmp_path_factory.mktemp("world"), REDUCED, workers=1)
    captioner = train_captioner(world, world / CAPTIONER_FOLDER, CaptionerTraining(epochs=6))
    return world, captioner


@pytest.fixture(scope="module")
def pipeline(synthetic, tmp_path_factory):
    """Prefix and aligned encoder shared by the later stages' tests (and the web page's): (world, llava, run)."""
    from helpers import align_flags, prefix_flags

    from dali.stages import align, prefix_tune

    world, llava = synthetic
    run = tmp_path_factory.mktemp("expe") / "run"
    assert prefix_tune.main([*prefix_flags(world, llava, 4), "--out", str(run / "prefix")]) == 0
    assert align.main(align_flags(world, llava) + ["--out", str(run / "align")]) == 0
    return world, llava, run


@pytest.fixture(scope="session")
def original_weights(tiny_llava_dir, tmp_path_factory):
    """Files in the layouts of the released DALI weights, for the tiny captioner (hidden 32, vision 32)."""
    from helpers import original_layout

    from dali.models.cav_mae import CAVMAEAudioEncoder, CAVMAEConfig

    source = tmp_path_factory.mktemp("released")
    torch.manual_seed(0)
    encoder = CAVMAEAudioEncoder(CAVMAEConfig(embed_dim=32, depth_audio=1, num_heads=2, patch_time=128, proj_dim=32))
    torch.save(original_layout(encoder, with_extras=True), source / "audio_backbone.pth")
    projector = {
        "model.mm_projector.0.weight": torch.randn(32, 32) * 0.1,
        "model.mm_projector.0.bias": torch.zeros(32),
        "model.mm_projector.2.weight": torch.randn(32, 32) * 0.1,
        "model.mm_projector.2.bias": torch.zeros(32),
    }
    torch.save(projector, source / "prefixMLP.bin")
    torch.save({"model.audio_tower.prefix": torch.randn(16, 32) * 1e-4}, source / "prefix.bin")
    return source, encoder
