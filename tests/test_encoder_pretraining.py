"""The world's audio encoder pretraining (dali/synthetic/encoder_pretraining.py), the resume of the world's two
trainings, and the pinned CPU kernels."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dali import cpu_kernels
from dali.cpu_kernels import NATIVE
from dali.models.cav_mae import CAVMAEAudioEncoder, load_audio_encoder
from dali.synthetic.encoder_pretraining import (
    EncoderPretraining,
    MaskedDecoder,
    VisualBranch,
    patchify,
    pretraining_loss,
)

SMALL = EncoderPretraining(encoder_dim=32, encoder_depth=1, encoder_heads=2, decoder_dim=16, vision_depth=1)


def test_patchify_gives_each_token_the_patch_the_encoder_embeds():
    """Token k of patchify is the patch PatchEmbed turns into token k: a one-hot kernel reads back one value."""
    encoder = CAVMAEAudioEncoder(SMALL.encoder_config())
    fbank = torch.randn(2, 1024, 128)
    target = patchify(fbank, encoder.config)
    mel_patch, time_patch = encoder.config.patch_shape
    for mel, frame in [(0, 0), (3, 77), (mel_patch - 1, time_patch - 1)]:
        kernel = torch.zeros_like(encoder.patch_embed_a.proj.weight)
        kernel[0, 0, mel, frame] = 1.0
        with torch.no_grad():
            encoder.patch_embed_a.proj.weight.copy_(kernel)
            encoder.patch_embed_a.proj.bias.zero_()
            embedded = encoder.patch_embed_a(fbank.unsqueeze(1).transpose(2, 3))[..., 0]  # [B, N]
        assert torch.equal(embedded, target[..., mel * time_patch + frame])


def _models(training):
    encoder = CAVMAEAudioEncoder(training.encoder_config())
    decoder = MaskedDecoder(encoder.config, training.decoder_dim, training.encoder_heads, training.time_bins)
    return encoder, decoder, VisualBranch(training, 64)


def test_both_objectives_learn_what_they_can_only_learn_from_the_data():
    """A few steps on fbanks with structure (each clip one steady spectrum: a hidden patch is its row's visible
    ones) and frames paired with them lower both the reconstruction and the contrast (the frame's brightness names
    its clip), the latter from chance (log of the batch) to well under it."""
    torch.manual_seed(0)
    training = dataclasses.replace(SMALL, contrast_weight=1.0)  # both objectives at one weight: each is seen
    models = torch.nn.ModuleList(_models(training))
    fbank = torch.randn(8, 1, 128).expand(8, 1024, 128)  # each clip one spectral profile, steady in time
    pixels = (torch.arange(8).float() * 30).view(8, 1, 1, 1).expand(8, 3, 64, 64)
    optimizer = torch.optim.Adam(models.parameters(), lr=3e-3)

    def losses():
        return pretraining_loss(*models, fbank, pixels, training, torch.Generator().manual_seed(1))

    _, first_reconstruction, first_contrast = losses()
    for step in range(60):
        loss, _, _ = pretraining_loss(*models, fbank, pixels, training, torch.Generator().manual_seed(step + 2))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    _, reconstruction, contrast = losses()
    assert reconstruction < 0.75 * first_reconstruction
    assert first_contrast > 0.75 * math.log(8) and contrast < 0.5 * math.log(8)  # chance is log(batch)


def test_the_pretrained_encoder_is_cached_keyed_and_starts_alignment(synthetic):
    from dali.synthetic.build import build_encoder
    from dali.synthetic.encoder_pretraining import MARKER

    world, _ = synthetic
    untouched = {path: hashlib.sha256(path.read_bytes()).hexdigest() for path in world.glob("*.json")}
    untouched[world / "test.csv"] = hashlib.sha256((world / "test.csv").read_bytes()).hexdigest()
    path = build_encoder(world, reduced=True, seed=0)
    marker = json.loads((path.parent / MARKER).read_text())
    metrics = [json.loads(line) for line in (path.parent / "metrics.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in metrics] == [1, 2] and marker["best_epoch"] in (1, 2)
    assert all(hashlib.sha256(p.read_bytes()).hexdigest() == digest for p, digest in untouched.items())
    clips = json.loads((world / "pretrain" / "pretrain.json").read_text())["data"]
    test_ids = {line.split(",")[0] for line in (world / "test.csv").read_text().splitlines()[1:]}
    listed = {json.loads((world / f"{split}.json").read_text())["data"][0]["video_id"] for split in ("align", "val")}
    assert clips and not {clip["video_id"] for clip in clips} & (test_ids | listed)
    assert all((world / "pretrain" / clip["wav"]).exists() for clip in clips)
    mtime = path.stat().st_mtime_ns
    assert build_encoder(world, reduced=True, seed=0) == path and path.stat().st_mtime_ns == mtime  # reused
    encoder = load_audio_encoder(path, new_proj_dim=48)  # what `dali align --init-encoder` does with it
    assert encoder.config.proj_dim == 48 and encoder.project(torch.zeros(1, 1024, 128)).shape == (1, 64, 48)


class KilledStep:
    """A training's step function, counted, that kills the run (KeyboardInterrupt) past ``kill_after`` steps;
    ``counts(*args)`` says which calls are training steps."""

    def __init__(self, step, kill_after: float, counts=lambda *args, **kwargs: True):
        self.step, self.kill_after, self.counts, self.taken = step, kill_after, counts, 0

    def __call__(self, *args, **kwargs):
        if self.counts(*args, **kwargs):
            self.taken += 1
            if self.taken > self.kill_after:
                raise KeyboardInterrupt
        return self.step(*args, **kwargs)


def _killed_then_resumed(train, module, name: str, per_epoch: int, folder: Path, counts=lambda *a, **k: True):
    """``train(folder)`` killed in its third epoch (its checkpoint left, no marker), then run again: the second
    run's result, after checking it took the third epoch's steps only and left no checkpoint."""
    killed = KilledStep(getattr(module, name), 2 * per_epoch, counts)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module, name, killed)
        with pytest.raises(KeyboardInterrupt):
            train(folder)
    assert list(folder.glob("checkpoint-*.pt")) and not (folder / module.MARKER).exists()
    counted = KilledStep(getattr(module, name), math.inf, counts)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module, name, counted)
        result = train(folder)
    assert counted.taken == per_epoch  # resumed after the second epoch
    assert not list(folder.glob("checkpoint-*.pt"))
    return result


def test_a_killed_pretraining_resumes_after_its_last_epoch_to_the_same_encoder(synthetic, tmp_path):
    """Killed in its third epoch, then run again: it resumes after the second (the model, optimiser, schedule and
    order of the checkpoint) and ends with the bytes of an uninterrupted run."""
    import dali.synthetic.encoder_pretraining as pretraining

    world, _ = synthetic
    settings = dataclasses.replace(SMALL, clips=48, epochs=3, batch_size=16)  # the reduced world's clip set
    whole = pretraining.pretrain_encoder(world, tmp_path / "whole", settings)
    per_epoch = math.ceil((48 - max(1, int(48 * settings.val_fraction))) / settings.batch_size)
    resumed = _killed_then_resumed(
        lambda folder: pretraining.pretrain_encoder(world, folder, settings), pretraining, "pretraining_loss",
        per_epoch, tmp_path / "killed", counts=lambda *args, **kwargs: torch.is_grad_enabled(),  # not held-out
    )  # fmt: skip
    assert resumed.read_bytes() == whole.read_bytes()
    assert (resumed.parent / "metrics.jsonl").read_text() == (whole.parent / "metrics.jsonl").read_text()


def test_a_killed_captioner_training_resumes_after_its_last_epoch_to_the_same_captioner(synthetic, tmp_path):
    """The world's other long training: killed in its third epoch, run again, it trains the third epoch only and
    ends with the weights and losses of an uninterrupted run."""
    import dali.synthetic.captioner as captioner

    world, _ = synthetic
    settings = captioner.CaptionerTraining(epochs=3)
    whole = captioner.train_captioner(world, tmp_path / "whole", settings)
    images = len(json.loads((world / "captioner" / "captions.json").read_text()))
    sentences = len((world / "captioner" / "text.txt").read_text().split("\n")) - 1
    per_epoch = math.ceil(images / settings.images_per_step) + math.ceil(sentences / settings.batch_size)
    resumed = _killed_then_resumed(
        lambda folder: captioner.train_captioner(world, folder, settings), captioner, "_task_loss", per_epoch,
        tmp_path / "killed",
    )  # fmt: skip
    assert (resumed / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()
    done = [json.loads((folder / captioner.MARKER).read_text()) for folder in (whole, resumed)]
    assert done[0]["final_loss"] == done[1]["final_loss"] and done[0]["steps"] == done[1]["steps"] == 3 * per_epoch


def test_the_dali_entry_pins_the_kernels_of_the_demo_and_keeps_what_the_user_set():
    code = (
        "import os; from dali import cli; cli.pin_environment(); import torch; "
        "print(torch.backends.cpu.get_cpu_capability(), os.environ.get('MKL_CBWR'))"
    )
    environment = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR", NATIVE)}
    pinned = subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True, check=True)
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if " avx2 " in flags:
        assert pinned.stdout.split() == ["AVX2", "AVX2"]
    mine = subprocess.run(
        [sys.executable, "-c", code],
        env=environment | {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert mine.stdout.split() == ["DEFAULT", "COMPATIBLE"]
    native = subprocess.run(
        [sys.executable, "-c", code], env=environment | {NATIVE: "1"}, capture_output=True, text=True, check=True
    )
    assert native.stdout.split()[1] == "None"  # nothing pinned


@pytest.mark.parametrize(
    "vendor, branch, mkl, shared",
    [
        ("GenuineIntel", "AVX2", "AVX2", "Intel processors with AVX2, with ATen at AVX2"),
        ("AuthenticAMD", "AVX2", "own dispatch on AuthenticAMD AMD EPYC", "this processor only"),
        ("AuthenticAMD", "BRANCH=COMPATIBLE,STRICT", "BRANCH=COMPATIBLE,STRICT", "every x86-64 processor"),
        ("GenuineIntel", None, "own dispatch on GenuineIntel Intel Xeon", "this processor only"),
        ("GenuineIntel", "AUTO", "AUTO", "this processor only"),
    ],
)
def test_the_kernels_say_which_hosts_share_the_table(monkeypatch, vendor, branch, mkl, shared):
    """MKL honours MKL_CBWR's branches on Intel processors and COMPATIBLE on every one: elsewhere the cache key
    names the processor (a model trained under its own dispatch is never reused on another) and the table is
    this processor's only."""
    facts = {"machine": "x86_64", "vendor_id": vendor, "model name": "Intel Xeon" if "Intel" in vendor else "AMD EPYC"}
    monkeypatch.setattr(cpu_kernels, "processor", lambda: facts)
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    if branch is None:
        monkeypatch.delenv("MKL_CBWR", raising=False)
    else:
        monkeypatch.setenv("MKL_CBWR", branch)
    recorded = cpu_kernels.kernel_facts()
    assert cpu_kernels.kernels_key()["mkl_cbwr"] == recorded["mkl_cbwr"] == mkl
    assert recorded["same_table_on"].startswith(shared)
    assert recorded["environment"]["MKL_CBWR"] == branch  # what was asked for, beside what ran


_TRAIN = """
import hashlib, sys
from dali import cpu_kernels
if sys.argv[1] == "pinned":
    cpu_kernels.pin_environment()
import torch
if sys.argv[1] == "pinned":
    cpu_kernels.pin_torch()
else:
    torch.set_num_threads(2)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 8, 8), torch.nn.Flatten(), torch.nn.Linear(64 * 64, 300),
                            torch.nn.GELU(), torch.nn.Linear(300, 10))
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
data, labels = torch.randn(64, 3, 64, 64), torch.randint(0, 10, (64,))
for _ in range(20):
    loss = torch.nn.functional.cross_entropy(model(data), labels)
    optimizer.zero_grad(); loss.backward(); optimizer.step()
print(hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest())
"""
AVX2_HOST = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


@pytest.mark.slow
def test_pinned_training_is_the_same_on_an_emulated_avx2_host():
    """Training with the pinned kernels gives the same weights on this host and on an emulated AVX2-only one
    (ATen, MKL and oneDNN restricted to AVX2, as on an AMD EPYC of Zen 2 or 3), where unpinned training differs."""
    base = {k: v for k, v in os.environ.items() if k not in {*AVX2_HOST, "MKL_CBWR", "OPENBLAS_CORETYPE"}}

    def weights(mode: str, host: dict) -> str:
        done = subprocess.run(
            [sys.executable, "-c", _TRAIN, mode], env=base | host, capture_output=True, text=True, check=True
        )
        return done.stdout.strip()

    if weights("plain", {}) == weights("plain", AVX2_HOST):
        pytest.skip("this host's unpinned kernels are those of an AVX2 host: nothing to pin here")
    assert weights("pinned", {}) == weights("pinned", {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"})
