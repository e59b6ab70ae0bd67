"""LLaVA's image side: pad to square, the base image's preprocessing, the patch tokens it feeds the projector,
and the vision tower loaded alone (alignment never runs the LLM)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from torch import nn

from dali.errors import ModelLoadError

# LLaVA-1.5 'pad': frames are padded to a square with the CLIP mean colour before CLIP's resize and crop.
CLIP_MEAN_RGB = (122, 116, 104)


def expand_to_square(image: Image.Image, fill: tuple[int, int, int] = CLIP_MEAN_RGB) -> Image.Image:
    """Pad an image to a centred square (LLaVA-1.5's ``image_aspect_ratio='pad'``); converts to RGB first."""
    image = image.convert("RGB")
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new("RGB", (side, side), fill)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def preprocess_images(image_processor, images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL images -> pixel values [B, 3, S, S] (pad to square, CLIP resize + crop + normalise)."""
    squares = [expand_to_square(image) for image in images]
    return image_processor(images=squares, return_tensors="pt")["pixel_values"]


@torch.no_grad()
def patch_tokens(
    tower: nn.Module, pixel_values: torch.Tensor, feature_layer: int = -2, select: str = "default"
) -> torch.Tensor:
    """Hidden states of ``feature_layer``, as LLaVA selects them: without CLIP's CLS token (``default``) or all of
    them (``full``: SigLIP has no CLS). [B, 3, S, S] -> [B, P, D]."""
    parameter = next(tower.parameters())
    hidden = layer_states(tower, pixel_values.to(parameter.device, parameter.dtype), feature_layer)
    return hidden[:, 1:] if select == "default" else hidden


def layer_states(tower: nn.Module, pixel_values: torch.Tensor, feature_layer: int) -> torch.Tensor:
    """``tower(pixel_values, output_hidden_states=True).hidden_states[feature_layer]`` [B, tokens, D], the same
    numbers, without the layers after ``feature_layer``: LLaVA reads CLIP's penultimate layer, and transformers
    runs every layer (CLIP's last is a quarter of the synthetic world's tower, 1/24 of CLIP-L). CLIP's own loop,
    stopped early; another tower (SigLIP) runs whole."""
    if type(tower).__name__ != "CLIPVisionModel":
        return tower(pixel_values, output_hidden_states=True).hidden_states[feature_layer]
    layers = tower.encoder.layers
    hidden = tower.pre_layrnorm(tower.embeddings(pixel_values))
    for layer in layers[: range(len(layers) + 1)[feature_layer]]:  # hidden_states[k] is the output of k layers
        hidden = layer(hidden, None)
    return hidden


def base_image_processor(source: str | Path, config):
    """The preprocessing of a LLaVA's base image (PIL backend: torchvision cannot be installed beside our CPU torch).

    LLaVA-1.5 and LLaVA-NeXT: CLIP's resize of the shortest edge and centre crop, from the folder's config.
    LLaVA-OneVision: a resize to the tower's square with the folder's mean and std (no crop), as its base image.
    """
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    if config.model_type != "llava_onevision":
        return CLIPImageProcessorPil.from_pretrained(source)
    saved, _ = CLIPImageProcessorPil.get_image_processor_dict(str(source))
    side = config.vision_config.image_size
    normalise = {key: saved[key] for key in ("image_mean", "image_std") if key in saved}
    return CLIPImageProcessorPil(size={"height": side, "width": side}, do_center_crop=False, **normalise)


class VisionTower(nn.Module):
    """LLaVA's CLIP tower alone, for stages that never run the LLM (alignment): loads only its weights."""

    def __init__(self, tower: nn.Module, image_processor, feature_layer: int, source: str = "", select="default"):
        super().__init__()
        self.tower = tower.eval().requires_grad_(False)
        self.image_processor = image_processor
        self.feature_layer, self.select = feature_layer, select
        self.source = source

    @property
    def hidden_size(self) -> int:
        return self.tower.config.hidden_size

    @property
    def num_tokens(self) -> int:
        return (self.tower.config.image_size // self.tower.config.patch_size) ** 2

    def preprocess_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return preprocess_images(self.image_processor, images)

    def image_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return patch_tokens(self.tower, pixel_values, self.feature_layer, self.select)

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
    ) -> "VisionTower":
        import json

        from safetensors import safe_open
        from transformers import AutoConfig, AutoModel

        folder = Path(name_or_path)
        if not folder.is_dir():  # a hub id: fetch the config and weights (on a machine with internet)
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(str(name_or_path), allow_patterns=["*.json", "*.safetensors"]))
        try:
            config = AutoConfig.from_pretrained(folder)  # any LLaVA family's: CLIP or SigLIP
            image_processor = base_image_processor(folder, config)
            tower = AutoModel.from_config(config.vision_config)
        except (OSError, ValueError, AttributeError) as error:
            raise ModelLoadError(f"cannot load the LLaVA vision tower from '{name_or_path}': {error}") from None
        index = folder / "model.safetensors.index.json"
        files = (
            sorted(set(json.loads(index.read_text())["weight_map"].values()))
            if index.exists()
            else ["model.safetensors"]
        )
        state = {}
        # Both key layouts: 'model.vision_tower.' (transformers >= 4.52) and 'vision_tower.' (older llava-hf).
        prefixes = ("model.vision_tower.", "vision_tower.")
        for name in files:
            with safe_open(str(folder / name), framework="pt") as handle:
                for key in handle.keys():
                    prefix = next((p for p in prefixes if key.startswith(p)), None)
                    if prefix is not None:
                        state[key[len(prefix) :]] = handle.get_tensor(key)
        expected = tower.state_dict()
        missing = sorted(set(expected) - set(state))
        if missing:
            raise ModelLoadError(f"'{name_or_path}' lacks vision-tower weights, e.g. {missing[:5]}")
        tower.load_state_dict({key: state[key] for key in expected})
        tower = tower.to(device=device, dtype=dtype)
        select = config.vision_feature_select_strategy
        return cls(tower, image_processor, config.vision_feature_layer, str(name_or_path), select)
