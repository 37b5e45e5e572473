"""Calibration for GPTQ: H = X^T X of every linear layer's inputs while the float model reads calibration text.

The text (data/calibration.txt beside this module) is shipped with the package and shares nothing with the
evaluation corpus, so quantization never sees the text it is judged on.
"""

from __future__ import annotations

from importlib import resources

import torch

from tokenfab.models.decoder import DecoderModel
from tokenfab.models.layers import Linear
from tokenfab.models.sequence import sequence_hidden
from tokenfab.tokenizer import Tokenizer, token_windows

WINDOW = 512


def calibration_windows(tokenizer: Tokenizer, max_tokens: int = 2048) -> list[list[int]]:
    text = resources.files("tokenfab.models").joinpath("data/calibration.txt").read_text(encoding="utf-8")
    return token_windows(tokenizer, text, WINDOW, max_tokens)


@torch.inference_mode()
def collect_hessians(model: DecoderModel, windows: list[list[int]]) -> dict[str, torch.Tensor]:
    """Linear module name -> H [in, in] (fp32, summed over every calibration token, scaled by 2/tokens)."""
    hessians: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    handles = []

    def hook(name: str):
        def add(_module, inputs):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
            if name not in hessians:
                hessians[name] = torch.zeros(x.shape[1], x.shape[1])
                counts[name] = 0
            hessians[name].addmm_(x.t(), x)
            counts[name] += x.shape[0]

        return add

    for name, module in model.named_modules():
        if isinstance(module, Linear) and module is not model.lm_head:
            handles.append(module.register_forward_pre_hook(hook(name)))
    try:
        for ids in windows:
            # The LM head reads the final hidden states; adding them directly skips 262k-wide logits.
            hook("lm_head")(model.lm_head, (sequence_hidden(model, ids),))
    finally:
        for handle in handles:
            handle.remove()
    return {name: h * (2.0 / counts[name]) for name, h in hessians.items()}
