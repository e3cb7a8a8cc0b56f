"""Supervised-token-normalised loss, and a chunked cross-entropy that never holds all fp32 logits.

Contract (CONTRACTS.md, "Loss"): for one optimizer step made of micro-batches m (and later ranks r),
with ``N`` = the number of targets ``!= IGNORE_INDEX`` over all of them,
``loss = sum_m sum_t CE(logits_t, target_t) / N``. Each micro-batch backpropagates its own
``sum_t CE / N``, so gradient accumulation (and, after an all-reduce of N, data parallelism) is exact:
the gradient equals that of one big batch, whatever the split.

Targets are already shifted (``targets[b, t]`` is the id after position t), so no shifting happens here.

The logits are the model's own: :class:`LMHead` applies the head as the model's forward does (weight, then
bias, then a scale, then tanh soft-capping), so the loss trained on is the loss the model reports.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from sft.data.schema import IGNORE_INDEX


def count_supervised(batches: Iterable[dict[str, torch.Tensor]]) -> int:
    """Number of targets ``!= IGNORE_INDEX`` over all ``batches`` (the ``N`` of one optimizer step)."""
    return int(sum(int((b["targets"] != IGNORE_INDEX).sum()) for b in batches))


@dataclass
class LMHead:
    """The output head of a causal LM, applied exactly as the model's forward applies it.

    ``logits = F.linear(h, weight, bias)`` (in the weight's dtype, as ``nn.Linear`` does), then in fp32
    ``logits * scale`` (if set), then ``softcap * tanh(logits / softcap)`` (if set).
    weight: ``[V, d]``; bias: ``[V]`` or None; scale, softcap: Python floats or None.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    scale: float | None = None
    softcap: float | None = None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits ``[..., V]`` of ``hidden`` ``[..., d]``."""
        logits = F.linear(hidden, self.weight, self.bias).float()
        if self.scale is not None:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def requires_grad(self) -> bool:
        return self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad)

    def zero_term(self) -> torch.Tensor:
        """``0 * sum(parameters)``: keeps the head in the graph when no position is supervised."""
        z = 0.0 * self.weight.sum()
        return z if self.bias is None else z + 0.0 * self.bias.sum()


def as_head(head: torch.Tensor | LMHead) -> LMHead:
    """``head`` itself, or a plain ``[V, d]`` weight wrapped as an :class:`LMHead` with nothing else."""
    return head if isinstance(head, LMHead) else LMHead(head)


def cross_entropy_sum(
    hidden: torch.Tensor, head: torch.Tensor | LMHead, targets: torch.Tensor
) -> torch.Tensor:
    """Reference: sum of CE over targets != IGNORE_INDEX, from the full fp32 logits of ``head``.

    hidden: [B, T, d] (any float dtype); head: an LMHead or a plain weight [V, d]; targets: [B, T] long.
    Returns a 0-d fp32 tensor.
    """
    logits = as_head(head).logits(hidden)
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def _chunk_ce(h: torch.Tensor, head: LMHead, t: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head.logits(h), t, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_cross_entropy_sum(
    hidden: torch.Tensor, head: torch.Tensor | LMHead, targets: torch.Tensor, chunk_size: int = 1024
) -> torch.Tensor:
    """Sum of CE over targets != IGNORE_INDEX, computed ``chunk_size`` tokens at a time.

    hidden: [B, T, d]; head: the model's :class:`LMHead` (``sft.model.models.lm_head``) or a plain weight [V, d];
    targets: [B, T] long, already shifted.
    Only supervised positions are gathered, then each chunk's logits ([chunk, V], fp32) are made,
    reduced and dropped; each chunk is checkpointed so backward recomputes its logits instead of
    keeping them. Peak extra memory is O(chunk_size * V) instead of O(B * T * V).
    Equal to :func:`cross_entropy_sum` up to float rounding. Returns a 0-d fp32 tensor.
    """
    head = as_head(head)
    d = hidden.size(-1)
    flat_t = targets.reshape(-1)
    keep = (flat_t != IGNORE_INDEX).nonzero(as_tuple=True)[0]
    # unsupervised positions never reach the LM head: with prompts masked that is often half the tokens
    h = hidden.reshape(-1, d).index_select(0, keep)
    t = flat_t.index_select(0, keep)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, h.size(0), chunk_size):
        hs, ts = h[start : start + chunk_size], t[start : start + chunk_size]
        if torch.is_grad_enabled() and (hs.requires_grad or head.requires_grad()):
            total = total + checkpoint(_chunk_ce, hs, head, ts, use_reentrant=False)
        else:
            total = total + _chunk_ce(hs, head, ts)
    if h.size(0) == 0:
        # keep the graph connected so backward of an all-masked micro-batch gives zero gradients
        total = total + 0.0 * hidden.sum() + head.zero_term()
    return total


def step_loss(ce_sum: torch.Tensor, n_step: int) -> torch.Tensor:
    """The micro-batch's share of the step loss: ``ce_sum / n_step``; n_step = supervised tokens of the whole step."""
    return ce_sum / max(int(n_step), 1)
