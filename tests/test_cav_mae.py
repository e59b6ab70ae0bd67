import dataclasses

import pytest
import torch
from helpers import original_layout

from dali.models.cav_mae import (
    CAVMAEAudioEncoder,
    CAVMAEConfig,
    load_audio_encoder,
    save_audio_encoder,
    sincos_pos_embed_2d,
)
from dali.models.checkpoints import CheckpointError

TINY = CAVMAEConfig(embed_dim=32, depth_audio=2, num_heads=4, target_frames=256, proj_dim=48)


def test_shapes_and_token_order():
    encoder = CAVMAEAudioEncoder(TINY).eval()
    assert TINY.grid == (8, 16) and TINY.num_tokens == 128
    fbank = torch.randn(2, 256, 128)
    assert encoder(fbank).shape == (2, 128, 32)
    assert encoder.project(fbank).shape == (2, 128, 48)
    # token index = freq_row * time_cols + time_col: a change in the last time patch of the top mel rows
    # moves patch token 15 before attention (checked on the patch embedding alone)
    bumped = fbank.clone()
    bumped[:, 240:256, 0:16] += 1.0
    base = encoder.patch_embed_a(fbank.unsqueeze(1).transpose(2, 3))
    moved = encoder.patch_embed_a(bumped.unsqueeze(1).transpose(2, 3))
    changed = (moved - base).abs().sum(-1)[0].nonzero().flatten().tolist()
    assert changed == [15]


def test_default_config_is_cav_mae_vit_b():
    config = CAVMAEConfig()
    assert config.num_tokens == 512 and config.grid == (8, 64)


def test_sincos_positions_time_first_then_frequency():
    table = sincos_pos_embed_2d(16, 2, 3)[0]  # tokens f*3 + t
    # first half encodes time: equal for tokens of the same time column, second half encodes frequency
    assert torch.allclose(table[1, :8], table[4, :8]) and not torch.allclose(table[1, 8:], table[4, 8:])
    assert torch.allclose(table[3, 8:], table[5, 8:])
    assert torch.allclose(table[0], torch.tensor([0.0] * 4 + [1.0] * 4 + [0.0] * 4 + [1.0] * 4))


@pytest.mark.parametrize("with_extras", [False, True])
def test_original_layout_loads_strictly(tmp_path, with_extras):
    encoder = CAVMAEAudioEncoder(TINY).eval()
    path = tmp_path / "audio_backbone.pth"
    torch.save(original_layout(encoder, with_extras), path)
    loaded = load_audio_encoder(path, num_heads=4)
    fbank = torch.randn(1, 256, 128)
    assert loaded.config == TINY
    assert torch.allclose(loaded.project(fbank), encoder.project(fbank), atol=1e-6)


def test_bare_cav_mae_gets_a_fresh_proj_only_when_asked(tmp_path):
    bare = CAVMAEAudioEncoder(dataclasses.replace(TINY, proj_dim=None))
    path = tmp_path / "audio_model.21.pth"
    torch.save(original_layout(bare, with_extras=True), path)
    assert load_audio_encoder(path, num_heads=4).proj is None
    assert load_audio_encoder(path, num_heads=4, new_proj_dim=48).proj.out_features == 48


def test_our_format_round_trips(tmp_path):
    encoder = CAVMAEAudioEncoder(TINY).eval()
    save_audio_encoder(encoder, tmp_path / "enc.safetensors")
    loaded = load_audio_encoder(tmp_path / "enc.safetensors")
    fbank = torch.randn(1, 256, 128)
    assert torch.equal(loaded.project(fbank), encoder.project(fbank))


def test_missing_unknown_and_misshaped_keys_are_named(tmp_path):
    encoder = CAVMAEAudioEncoder(TINY)
    state = original_layout(encoder, with_extras=False)
    del state["module.blocks_a.1.mlp.fc2.bias"]
    torch.save(state, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="blocks_a.1.mlp.fc2.bias"):
        load_audio_encoder(tmp_path / "missing.pth", num_heads=4)
    state = original_layout(encoder, with_extras=False)
    state["module.surprise.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "unknown.pth")
    with pytest.raises(CheckpointError, match="surprise.weight"):
        load_audio_encoder(tmp_path / "unknown.pth", num_heads=4)
    state = original_layout(encoder, with_extras=False)
    state["module.norm_a.weight"] = torch.zeros(31)
    torch.save(state, tmp_path / "shape.pth")
    with pytest.raises(CheckpointError, match="norm_a.weight"):
        load_audio_encoder(tmp_path / "shape.pth", num_heads=4)
    (tmp_path / "trunc.pth").write_bytes((tmp_path / "shape.pth").read_bytes()[:100])
    with pytest.raises(CheckpointError, match="trunc.pth"):
        load_audio_encoder(tmp_path / "trunc.pth")
