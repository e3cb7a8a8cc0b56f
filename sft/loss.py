"""Supervised-token-normalised loss, and a chunked cross-entropy that never holds all fp32 logits.

Contract (CONTRACTS.md, "Loss"): for one optimizer step made of micro-batches m (and later ranks r),
with ``N`` = the number of targets ``!= IGNORE_INDEX`` over all of them,
``loss = sum_m sum_t CE(logits_t, target_t) / N``. Each micro-batch backpropagates its own
``sum_t CE / N``, so gradient accumulation (and, after an all-reduce of N, data parallelism) is exact:
the gradient equals that of one big batch, whatever the split.

Targets are already shifted (``targets[b, t]`` is the id after position t), so no shifting happens here.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from sft.schema import IGNORE_INDEX


def count_supervised(batches: Iterable[dict[str, torch.Tensor]]) -> int:
    """Number of targets ``!= IGNORE_INDEX`` over all ``batches`` (the ``N`` of one optimizer step)."""
    return int(sum(int((b["targets"] != IGNORE_INDEX).sum()) for b in batches))


def cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Reference: sum of CE over targets != IGNORE_INDEX, from full logits ``hidden @ weight.T`` in fp32.

    hidden: [B, T, d] (any float dtype); weight: [V, d]; targets: [B, T] long. Returns a 0-d fp32 tensor.
    """
    logits = (hidden @ weight.t()).float()
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def _chunk_ce(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    logits = (h @ w.t()).float()
    return F.cross_entropy(logits, t, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_cross_entropy_sum(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int = 1024
) -> torch.Tensor:
    """Sum of CE over targets != IGNORE_INDEX, computed ``chunk_size`` tokens at a time.

    hidden: [B, T, d]; weight: [V, d] (the LM head); targets: [B, T] long, already shifted.
    Only supervised positions are gathered, then each chunk's logits ([chunk, V], fp32) are made,
    reduced and dropped; each chunk is checkpointed so backward recomputes its logits instead of
    keeping them. Peak extra memory is O(chunk_size * V) instead of O(B * T * V).
    Equal to :func:`cross_entropy_sum` up to float rounding. Returns a 0-d fp32 tensor.
    """
    d = hidden.size(-1)
    flat_t = targets.reshape(-1)
    keep = (flat_t != IGNORE_INDEX).nonzero(as_tuple=True)[0]
    # unsupervised positions never reach the LM head: with prompts masked that is often half the tokens
    h = hidden.reshape(-1, d).index_select(0, keep)
    t = flat_t.index_select(0, keep)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, h.size(0), chunk_size):
        hs, ts = h[start : start + chunk_size], t[start : start + chunk_size]
        if torch.is_grad_enabled() and (hs.requires_grad or weight.requires_grad):
            total = total + checkpoint(_chunk_ce, hs, weight, ts, use_reentrant=False)
        else:
            total = total + _chunk_ce(hs, weight, ts)
    if h.size(0) == 0:
        # keep the graph connected so backward of an all-masked micro-batch gives zero gradients
        total = total + 0.0 * hidden.sum() + 0.0 * weight.sum()
    return total


def step_loss(ce_sum: torch.Tensor, n_step: int) -> torch.Tensor:
    """The micro-batch's share of the step loss: ``ce_sum / n_step``; n_step = supervised tokens of the whole step."""
    return ce_sum / max(int(n_step), 1)
