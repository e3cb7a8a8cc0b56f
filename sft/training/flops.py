"""FLOPs, peak FLOP/s and MFU: the one place the project counts them (trainer, benchmarks, reports).

Contract: FLOPs per processed token = ``6 N + 12 L d T_attn`` (PaLM, appendix B; llm-foundry uses the same),
``N`` all parameters, ``L`` layers, ``d`` model width, ``T_attn`` the token-weighted mean length of the
document each token attends within (``sum n_doc^2 / sum n_doc``; a packed row's padding tail counts as a
document of its own). MFU = achieved FLOP/s over the device's dense bf16 peak from :data:`PEAK_FLOPS`
(keyed by a substring of the CUDA device name); ``None`` on CPU or an unknown GPU. FP8 runs are still
divided by the bf16 peak (so their MFU can exceed what bf16 could reach; tokens/s is their headline).
"""

from __future__ import annotations

import torch

# dense bf16 tensor-core peaks, FLOP/s (vendor datasheets; SXM parts for H100/H200)
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "4090": 165e12}


def peak_flops(device: torch.device | str) -> float | None:
    """Dense bf16 peak of ``device`` from :data:`PEAK_FLOPS`; None on CPU or for an unknown GPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def attention_flops_tokens(document_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> int:
    """``sum over documents of n_doc^2`` for a ``[B, T]`` document-id tensor: padding counts as a document of
    its own, unless ``attention_mask`` (1 = real token) is given, then only the real documents count."""
    total = 0
    for i, row in enumerate(document_ids):
        if attention_mask is not None:
            row = row[attention_mask[i].bool()]
        counts = torch.unique_consecutive(row, return_counts=True)[1]
        total += int((counts.long() ** 2).sum())
    return total


def step_flops(n_params: int, n_layers: int, d_model: int, tokens: int, attn_tokens: int) -> float:
    """FLOPs of one training step over ``tokens`` tokens whose :func:`attention_flops_tokens` is
    ``attn_tokens``: ``6 N tokens + 12 L d sum n_doc^2``."""
    return 6.0 * n_params * tokens + 12.0 * n_layers * d_model * attn_tokens


def flops_per_token(n_params: int, n_layers: int, d_model: int, t_attn: float) -> float:
    """``6 N + 12 L d T_attn`` for one token attending over ``t_attn`` positions on average."""
    return 6.0 * n_params + 12.0 * n_layers * d_model * t_attn


def mfu(flops: float, seconds: float, peak: float | None, world: int = 1) -> float | None:
    """Model FLOPs utilisation: ``flops / seconds / (peak * world)``; None when the peak is unknown."""
    if peak is None or seconds <= 0:
        return None
    return flops / seconds / (peak * world)


def step_mfus(n_params: int, n_layers: int, d_model: int, res, peak: float | None, world: int = 1) -> tuple:
    """``(MFU on processed tokens, MFU on non-pad tokens)`` of one engine step ``res`` (a StepResult: token
    and attention counts summed over the ``world`` ranks, so the peak is ``peak * world``)."""
    processed = step_flops(n_params, n_layers, d_model, res.processed, res.attn_tokens)
    nonpad = step_flops(n_params, n_layers, d_model, res.nonpad, res.attn_tokens_nonpad)
    return mfu(processed, res.dt, peak, world), mfu(nonpad, res.dt, peak, world)
