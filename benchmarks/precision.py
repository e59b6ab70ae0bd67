"""What bf16 changes against fp32: greedy captions of the same clips, LLaVA-1.5-7B shapes with random weights.

Three settings of the whole captioning path (features, CAV-MAE encoder, distilled projector, LLaVA):
  fp32: everything float32;
  bf16 LLaVA only: what ``--dtype bfloat16`` did before it meant the whole path (encoder and projector float32);
  bf16: everything bfloat16, as the original evaluated (``--dtype bfloat16`` now).
Printed: per setting against fp32, the share of clips whose greedy token ids are identical, the share of the
first token, and the mean share of positions that agree before the first difference. Usage on a GPU:
``python benchmarks/precision.py [--clips 64] [--new-tokens 32]``.
"""

from __future__ import annotations

import argparse
import copy

import torch
from common import benchmark_tokenizer, device_name, llava_7b_config, random_llava, report

from dali.audio import kaldi_fbank, normalize_fbank, pad_or_crop
from dali.captioning import CaptioningModels
from dali.models.captioner import Captioner
from dali.models.cav_mae import CAVMAEAudioEncoder, CAVMAEConfig


def agreement(reference: torch.Tensor, other: torch.Tensor) -> dict:
    same = reference == other  # [clips, tokens]
    prefix = torch.cumprod(same.int(), dim=1).sum(dim=1).float() / same.shape[1]
    return {
        "identical_captions": round(float(same.all(dim=1).float().mean()), 4),
        "first_token": round(float(same[:, 0].float().mean()), 4),
        "agreeing_prefix": round(float(prefix.mean()), 4),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clips", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--text-layers", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    llava = random_llava(llava_7b_config(text_layers=args.text_layers), dtype=torch.float32)
    captioner = Captioner(llava, benchmark_tokenizer(), image_processor=None, source="random LLaVA-1.5-7B shapes")
    encoder = CAVMAEAudioEncoder(CAVMAEConfig()).to("cuda").eval()
    projector = copy.deepcopy(captioner.projector)
    with torch.no_grad():
        for parameter in projector.parameters():  # a distilled copy: LLaVA's projector, moved a little
            parameter.add_(0.01 * torch.randn_like(parameter))
    waves = torch.randn(args.clips, 160_000, device="cuda") * 0.1
    fbank = normalize_fbank(pad_or_crop(kaldi_fbank(waves)))

    def greedy(models: CaptioningModels) -> torch.Tensor:
        ids = []
        for start in range(0, args.clips, 32):
            inputs = models.captioner.build_inputs(models.block(fbank[start : start + 32]))
            out = models.captioner.llava.generate(
                **inputs,
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                do_sample=False,
                pad_token_id=3,
            )
            ids.append(out[:, -args.new_tokens :].cpu())
        return torch.cat(ids)

    rows = {"clips": args.clips, "new_tokens": args.new_tokens}
    reference = greedy(CaptioningModels(captioner, encoder, None, projector))
    llava.to(torch.bfloat16)
    rows["bf16_llava_only"] = agreement(reference, greedy(CaptioningModels(captioner, encoder, None, projector)))
    whole = CaptioningModels(captioner, encoder.to(torch.bfloat16), None, projector.to(torch.bfloat16))
    rows["bf16_whole_path"] = agreement(reference, greedy(whole))
    report("precision", rows | {"device": device_name()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
