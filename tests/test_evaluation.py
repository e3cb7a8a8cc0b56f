"""Evaluation (sft/training/evaluation.py): loss and token accuracy, per-source combination, stop rate, keep-best."""

import contextlib
import math

import pytest
import torch

from sft.data.packing import pad_collate
from sft.data.render import render_batch, stop_token_ids
from sft.data.schema import IGNORE_INDEX
from sft.model import generate
from sft.model.loss import chunked_cross_entropy_sum, count_supervised
from sft.model.models import byte_tokenizer, forward_hidden, tiny_model
from sft.training import evaluation

CPU = torch.device("cpu")


def convs(words):
    return [
        [{"role": "user", "content": f"Say ok to {w}."}, {"role": "assistant", "content": "ok"}]
        for w in words
    ]


def trained(mask_end_of_turn: bool, steps: int = 40):
    """A tiny Llama overfit (40 steps, CPU, ~3 s) on 'Say ok to X.' -> 'ok<|im_end|>', with or without the
    end-of-turn token among the targets."""
    tok = byte_tokenizer()
    model = tiny_model("tiny-llama", len(tok), seed=0)
    samples, _ = render_batch(
        convs(["cats", "dogs", "rain", "tea", "maps", "jazz", "owls", "figs"]), tok, None
    )
    end = stop_token_ids(tok)
    for s in samples:
        if mask_end_of_turn:
            s.labels = [IGNORE_INDEX if t in end else lab for t, lab in zip(s.input_ids, s.labels)]
    batch = pad_collate(samples, tok.pad_token_id)
    n = count_supervised([batch])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for _ in range(steps):
        h, w = forward_hidden(model, batch)
        (chunked_cross_entropy_sum(h, w, batch["targets"]) / n).backward()
        opt.step()
        opt.zero_grad()
    return model, tok


def answers(model, tok, words, max_new=8):
    def greedy(ids, m, stops):
        return generate.greedy(model, ids, m, stops, CPU, contextlib.nullcontext, tok)

    return evaluation.answer(model, tok, convs(words), template=None, max_new_tokens=max_new, greedy=greedy)


def test_stop_rate_one_when_trained_to_stop_and_zero_when_the_end_token_is_masked():
    held_out = ["bees", "kites", "soup", "moss"]  # prompts the models never saw
    model, tok = trained(mask_end_of_turn=False)
    got = answers(model, tok, held_out)
    assert evaluation.stop_rate(got) == 1.0, got
    assert [a["answer"] for a in got] == ["ok"] * 4 and all(a["new_tokens"] == 2 for a in got)
    masked, tok = trained(mask_end_of_turn=True)
    got = answers(masked, tok, held_out)
    assert evaluation.stop_rate(got) == 0.0, got
    assert all(a["new_tokens"] == 8 and a["answer"].startswith("ok") for a in got)
    assert evaluation.stop_rate([]) is None


def test_measure_equals_the_trainers_held_out_loss_and_counts_correct_tokens():
    tok = byte_tokenizer()
    model = tiny_model("tiny-llama", len(tok), seed=1)
    samples, _ = render_batch(convs(["a", "bb", "ccc"]), tok, None)
    batches = [pad_collate(samples[:2], tok.pad_token_id), pad_collate(samples[2:], tok.pad_token_id)]
    ce, n, correct = evaluation.measure(model, batches, device=CPU, autocast=contextlib.nullcontext, chunk=7)
    loss, n_ref = evaluation.evaluate(model, batches, CPU, contextlib.nullcontext, 1024)
    assert n == n_ref == sum(s.n_supervised for s in samples) and ce / n == pytest.approx(loss, rel=1e-6)
    with torch.no_grad():  # accuracy by hand from full logits
        ref = 0
        for b in batches:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            sup = b["targets"] != IGNORE_INDEX
            ref += int((logits.argmax(-1)[sup] == b["targets"][sup]).sum())
    assert correct == ref


def test_measure_of_the_fsdp_loss_module_is_the_plain_models_loss_without_accuracy():
    """One measure for both roots: the FSDP root (LossModule: its forward gives the CE sum, no logits) gets the
    plain model's CE sum and count, and no accuracy; both equal the training loss summed over the batches."""
    from sft.training.distributed import LossModule

    tok = byte_tokenizer()
    model = tiny_model("tiny-llama", len(tok), seed=1)
    samples, _ = render_batch(convs(["a", "bb", "ccc"]), tok, None)
    batches = [pad_collate(samples[:2], tok.pad_token_id), pad_collate(samples[2:], tok.pad_token_id)]
    kw = dict(device=CPU, autocast=contextlib.nullcontext, chunk=7)
    ce, n, correct = evaluation.measure(model, batches, **kw)
    ce_root, n_root, correct_root = evaluation.measure(LossModule(model, 5), batches, **kw)
    with torch.no_grad():
        ref = sum(float(chunked_cross_entropy_sum(*forward_hidden(model, b), b["targets"])) for b in batches)
    assert n == n_root == sum(s.n_supervised for s in samples)
    assert ce == pytest.approx(ref, rel=1e-6) and ce_root == pytest.approx(ref, rel=1e-6)
    assert correct is not None and correct_root is None
    assert evaluation.measure(LossModule(model), [], **kw) == (0.0, 0, None)


def test_combine_weights_every_token_once():
    m = evaluation.combine({"a": (6.0, 3, 2), "b": (2.0, 1, 1), "empty": (0.0, 0, 0)})
    assert m == {
        "eval_loss": 2.0,
        "eval_token_accuracy": 0.75,
        "eval_tokens_supervised": 4,
        "eval_loss_by_source": {"a": 2.0, "b": 2.0, "empty": None},
    }
    assert evaluation.combine({"a": (6.0, 3, None)})["eval_token_accuracy"] is None
    assert math.isnan(evaluation.combine({})["eval_loss"])


def test_keep_best_keeps_the_step_with_the_lowest_loss():
    best, history = None, []
    for step, loss in [(10, 2.5), (20, 2.1), (30, float("nan")), (40, 2.3), (50, 2.1), (60, 1.9), (70, 2.0)]:
        best, improved = evaluation.update_best(best, step, loss)
        history.append(improved)
    assert best == {"step": 60, "eval_loss": 1.9}
    assert history == [True, True, False, False, False, True, False]  # NaN never wins, a tie keeps step 20
