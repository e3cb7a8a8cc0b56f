"""Evaluation a user can act on: held-out loss per source, token accuracy, stop rate, best checkpoint.

- :func:`measure` -> ``(ce_sum, n, correct)`` over held-out batches: the sum of CE over the supervised
  targets (equal to ``sft.model.loss.chunked_cross_entropy_sum`` summed over the batches), their number ``n``,
  and how many of them are the model's argmax (token accuracy = ``correct / n``; None under FSDP, whose loss
  module gives no logits). Logits are made ``chunk`` supervised tokens at a time, as in training; under
  FSDP each rank measures its share of the batches and the sums are all-reduced.
- :func:`combine` -> the metrics of one evaluation from per-source sums: ``eval_loss`` (sum CE / sum n over
  every source: each token counts once), ``eval_token_accuracy`` (None when a source had no accuracy, e.g.
  under FSDP), ``eval_tokens_supervised`` and ``eval_loss_by_source`` (source name -> its loss).
- :func:`answer` -> greedy answers to held-out prompts (the conversation up to its last user turn,
  ``sft.data.render.render_prompt``), each with ``stopped``: the answer ended with a stop token
  (``sft.data.render.stop_token_ids``: EOS or the template's end-of-turn token) within ``max_new_tokens``.
  :func:`stop_rate` is the fraction stopped: a model that never learned to end its turn scores 0.
- :func:`update_best` is ``--keep_best``'s rule: the lowest finite held-out loss wins, ties keep the earlier
  step; :func:`track_best`, :func:`save_best` and :func:`load_best` apply it to a run (``<run>/best/``).

What the trainer calls: :func:`held_out` (one evaluation's metrics, the eval keys of metrics.jsonl),
:func:`answer_samples` (greedy answers, ``sft.model.generate.greedy``, the model's blocks run uncompiled:
:func:`for_generation`),
:func:`evaluate` (the loss alone, from :func:`measure`), :func:`eval_line` / :func:`print_samples` (the console).
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from sft.config import TrainConfig
from sft.data.schema import IGNORE_INDEX, Conversation
from sft.model import generate
from sft.model.family import is_ours
from sft.model.loss import as_head
from sft.model.models import forward_hidden
from sft.training import distributed, runs
from sft.training.distributed import DistInfo
from sft.training.engine import ce_sum, set_attention

log = logging.getLogger("sft")


@torch.no_grad()
def measure(
    model, batches, *, device, autocast, chunk: int = 1024, fwd=forward_hidden, info: DistInfo | None = None
) -> tuple[float, int, int | None]:
    """``(sum CE, supervised targets, correct argmax predictions)`` over ``batches`` (Batch dicts).

    ``model``: a plain model, or the FSDP root (:class:`sft.training.distributed.LossModule`), whose forward
    runs the head and the loss and gives no logits: its CE is ``sft.training.engine.ce_sum`` and ``correct``
    is None. Distributed (``info`` enabled): rank r takes batches r, r + W, ...; ranks with one batch fewer run
    a batch with every target ignored (FSDP needs the same number of forwards on every rank); the sums are
    all-reduced.
    """
    sharded = isinstance(model, distributed.LossModule)
    spread = info is not None and info.enabled
    if not batches:
        return 0.0, 0, None if sharded else 0
    if spread:
        W = info.world
        dummy = {**batches[0], "targets": torch.full_like(batches[0]["targets"], IGNORE_INDEX)}
        mine = batches[info.rank :: W]
        batches = mine + [dummy] * (math.ceil(len(batches) / W) - len(mine))
    was_training = model.training
    model.eval()
    total, n, correct = 0.0, 0, 0
    for b in batches:
        b = {k: v.to(device) for k, v in b.items()}
        if sharded:
            with autocast():
                total += float(ce_sum(model, b, chunk))
            n += int((b["targets"] != IGNORE_INDEX).sum())
            continue
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
    if spread:
        total, n = distributed.all_reduce_sum(total, info), distributed.all_reduce_sum(n, info)
        if not sharded:
            correct = distributed.all_reduce_sum(correct, info)
    return total, n, None if sharded else correct


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


# ----------------------------------------------------------------------------- what the trainer calls


@contextlib.contextmanager
def for_generation(model):
    """Generation runs the blocks uncompiled (the compiled graphs are for the training row shape: a new
    length each token would recompile) and, for transformers models, with SDPA attention."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    hf = not is_ours(model) and impl not in (None, "sdpa", "eager")
    if hf:
        set_attention(model, "sdpa")
    try:
        with torch.compiler.set_stance("force_eager"):
            yield
    finally:
        if hf:
            model.config._attn_implementation = impl
            if hasattr(model, "set_attn_implementation"):
                model.set_attn_implementation(impl)


def evaluate(model, batches, device, autocast, chunk: int, info: DistInfo | None = None) -> tuple[float, int]:
    """Held-out loss alone: ``(sum CE / N, N)`` of :func:`measure` (``(nan, 0)`` without batches)."""
    if not batches:
        return float("nan"), 0
    total, n, _ = measure(model, batches, device=device, autocast=autocast, chunk=chunk, info=info)
    return total / max(n, 1), n


def answer_samples(model, tokenizer, conversations, cfg: TrainConfig, device, autocast, n=None) -> list[dict]:
    """Greedy answers to the first ``n`` (default ``num_samples``) held-out conversations' last user turn
    (reference = the data's answer; ``stopped``: ended with the end-of-turn token; sft/training/evaluation.py)."""

    def answer_greedily(ids, max_new, stops):
        with for_generation(model):
            return generate.greedy(model, ids, max_new, stops, device, autocast, tokenizer)

    n = cfg.num_samples if n is None else n
    return answer(
        model, tokenizer, conversations[:n], template=cfg.template, max_new_tokens=cfg.samples_max_new_tokens,
        greedy=answer_greedily,
    )  # fmt: skip


def held_out(root, model, tokenizer, eval_batches, prepared, cfg, device, autocast, info, fwd) -> dict:
    """One evaluation's metrics (the eval keys of metrics.jsonl after step and epoch): loss overall and per
    held-out source, token accuracy, stop rate over ``--eval_prompts`` held-out prompts (sft/training/evaluation.py).
    Under FSDP the loss alone (the sharded loss module gives no logits and no generation): the rest is None."""
    per = {
        name: measure(
            root, batches, device=device, autocast=autocast, chunk=cfg.loss_chunk, fwd=fwd, info=info
        )
        for name, batches in eval_batches.items()
    }
    m = combine(per)
    rate = None
    if cfg.eval_prompts and not info.enabled and prepared.eval_conversations:
        convs = prepared.eval_conversations
        rate = stop_rate(answer_samples(model, tokenizer, convs, cfg, device, autocast, cfg.eval_prompts))
    return {
        "eval_loss": m["eval_loss"],
        "eval_tokens_supervised": m["eval_tokens_supervised"],
        "eval_token_accuracy": m["eval_token_accuracy"],
        "eval_stop_rate": rate,
        "eval_loss_by_source": m["eval_loss_by_source"],
    }


def eval_line(step: int, ev: dict) -> str:
    """The console line of one evaluation: loss, per source when several, token accuracy, stop rate."""
    per = ev["eval_loss_by_source"]
    srcs = (
        " (" + ", ".join(f"{k} {v:.4f}" for k, v in per.items() if v is not None) + ")"
        if len(per) > 1
        else ""
    )
    acc, stop = ev["eval_token_accuracy"], ev["eval_stop_rate"]
    head = f"step {step}: held-out loss" if step else "held-out loss before training:"
    return (
        f"{head} {ev['eval_loss']:.4f}{srcs} on {ev['eval_tokens_supervised']} tokens"
        + (f" | token accuracy {acc:.3f}" if acc is not None else "")
        + (f" | stop rate {stop:.2f}" if stop is not None else "")
    )


def save_best(run_dir: Path, model, best: dict) -> None:
    """``--keep_best``: the trainable weights of step ``best["step"]`` to ``<run>/best/`` (temp + rename)."""
    from safetensors.torch import save_file

    tmp = run_dir / "best.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    trainable = {k: p.detach().cpu().contiguous() for k, p in model.named_parameters() if p.requires_grad}
    save_file(trainable, str(tmp / "trainable.safetensors"))
    runs._write_json(tmp / "best.json", best)
    shutil.rmtree(run_dir / "best", ignore_errors=True)
    tmp.rename(run_dir / "best")


def load_best(run_dir: Path, model) -> dict:
    """Put ``<run>/best/``'s trainable weights back into ``model``; returns its ``{"step", "eval_loss"}``."""
    from safetensors.torch import load_file

    weights = load_file(str(run_dir / "best" / "trainable.safetensors"))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in weights.items():
            params[k].copy_(v)
    return runs._read_json(run_dir / "best" / "best.json")


def track_best(state: dict, ev: dict, cfg: TrainConfig, run_dir: Path, model, info: DistInfo) -> None:
    """``state["best"]``: the step with the lowest held-out loss so far; with ``--keep_best`` its weights are
    kept in ``<run>/best/`` (sft/training/evaluation.py's rule)."""
    state["best"], improved = update_best(state.get("best"), state["step"], ev["eval_loss"])
    if improved and cfg.keep_best and info.is_main:
        save_best(run_dir, model, state["best"])


def print_samples(stage: str, samples: list[dict]) -> None:
    for i, s in enumerate(samples):
        log.info(
            "[%s] sample %d\n  prompt: %s\n  answer: %s",
            stage,
            i + 1,
            _short(s["prompt"]),
            _short(s["answer"]),
        )


def _short(text: str, n: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 3] + "..."
