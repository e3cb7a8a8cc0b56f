"""Evaluation a user can act on: held-out loss per source, token accuracy, stop rate, best checkpoint.

- :func:`measure` -> ``(ce_sum, n, correct)`` over held-out batches of a plain model: the sum of CE over the
  supervised targets (equal to ``sft.model.loss.chunked_cross_entropy_sum`` summed over the batches), their
  number ``n``, and how many of them are the model's argmax (token accuracy = ``correct / n``). Logits are
  made ``chunk`` supervised tokens at a time, as in training.
- :func:`combine` -> the metrics of one evaluation from per-source sums: ``eval_loss`` (sum CE / sum n over
  every source: each token counts once), ``eval_token_accuracy`` (None when a source had no accuracy, e.g.
  under FSDP), ``eval_tokens_supervised`` and ``eval_loss_by_source`` (source name -> its loss).
- :func:`answer` -> greedy answers to held-out prompts (the conversation up to its last user turn,
  ``sft.data.render.render_prompt``), each with ``stopped``: the answer ended with a stop token
  (``sft.data.render.stop_token_ids``: EOS or the template's end-of-turn token) within ``max_new_tokens``.
  :func:`stop_rate` is the fraction stopped: a model that never learned to end its turn scores 0.
- :func:`update_best` is ``--keep_best``'s rule: the lowest finite held-out loss wins, ties keep the earlier
  step.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from sft.data.schema import IGNORE_INDEX, Conversation
from sft.model.loss import as_head
from sft.model.models import forward_hidden


@torch.no_grad()
def measure(
    model, batches, *, device, autocast, chunk: int = 1024, fwd=forward_hidden
) -> tuple[float, int, int]:
    """``(sum CE, supervised targets, correct argmax predictions)`` over ``batches`` (Batch dicts)."""
    was_training = model.training
    model.eval()
    total, n, correct = 0.0, 0, 0
    for b in batches:
        b = {k: v.to(device) for k, v in b.items()}
        with autocast():
            h, head = fwd(model, b)
        head = as_head(head)  # the model's own head (sft.model.models.lm_head): bias, scale, soft-capping
        flat_t = b["targets"].reshape(-1)
        keep = (flat_t != IGNORE_INDEX).nonzero(as_tuple=True)[0]
        hs, ts = h.reshape(-1, h.size(-1)).index_select(0, keep), flat_t.index_select(0, keep)
        for a in range(0, hs.size(0), chunk):
            logits = head.logits(hs[a : a + chunk])
            total += float(F.cross_entropy(logits, ts[a : a + chunk], reduction="sum"))
            correct += int((logits.argmax(-1) == ts[a : a + chunk]).sum())
        n += int(keep.numel())
    model.train(was_training)
    return total, n, correct


def combine(per_source: dict[str, tuple[float, int, int | None]]) -> dict:
    """One evaluation's metrics from ``{source: (ce_sum, n, correct or None)}`` (see the module docstring)."""
    ce = sum(v[0] for v in per_source.values())
    n = sum(v[1] for v in per_source.values())
    correct = [v[2] for v in per_source.values()]
    return {
        "eval_loss": ce / n if n else float("nan"),
        "eval_token_accuracy": (sum(correct) / n if n else None) if None not in correct else None,
        "eval_tokens_supervised": n,
        "eval_loss_by_source": {k: (v[0] / v[1] if v[1] else None) for k, v in per_source.items()},
    }


Greedy = Callable[[list[int], int, list[int]], list[int]]  # (prompt ids, max new tokens, stop ids) -> new ids


@torch.no_grad()
def answer(
    model, tokenizer, conversations: list[Conversation], *, template, max_new_tokens: int, greedy: Greedy
) -> list[dict]:
    """Greedy answers to each conversation's last user turn; the reference is the reply after it.

    Each answer: ``prompt`` (the last user message), ``reference``, ``answer`` (decoded, stop token
    removed), ``new_tokens`` and ``stopped`` (the answer ended with a stop token).
    """
    from sft.data.render import render_prompt, stop_token_ids

    stops = list(stop_token_ids(tokenizer, template))
    was_training = model.training
    model.eval()
    out = []
    for conv in conversations:
        last_user = max(i for i, m in enumerate(conv) if m["role"] == "user")
        prompt_conv = conv[: last_user + 1]
        reference = conv[last_user + 1]["content"] if last_user + 1 < len(conv) else None
        new = list(greedy(list(render_prompt(prompt_conv, tokenizer, template)), max_new_tokens, stops))
        stopped = bool(new) and new[-1] in stops
        if stopped:
            new = new[:-1]
        out.append(
            {
                "prompt": prompt_conv[-1]["content"],
                "reference": reference,
                "answer": tokenizer.decode(new, skip_special_tokens=False).strip(),
                "new_tokens": len(new),
                "stopped": stopped,
            }
        )
    model.train(was_training)
    return out


def stop_rate(answers: list[dict]) -> float | None:
    """Fraction of ``answers`` that ended with a stop token; None when there are none."""
    return sum(a["stopped"] for a in answers) / len(answers) if answers else None


def update_best(best: dict | None, step: int, loss: float) -> tuple[dict | None, bool]:
    """``--keep_best``: ``({"step", "eval_loss"} of the best so far, whether ``step`` is the new best)``.

    The lowest finite loss wins; a tie keeps the earlier step; a NaN/inf loss never wins.
    """
    if not math.isfinite(loss) or (best is not None and loss >= best["eval_loss"]):
        return best, False
    return {"step": int(step), "eval_loss": float(loss)}, True
