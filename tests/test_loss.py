"""Loss normalisation (mean over the supervised targets of the whole step) and the chunked cross-entropy,
checked on tiny models: packed == unpacked, (micro-batch 8, accum 1) == (2, 4), in loss and gradients."""

import pytest
import torch
import torch.nn.functional as F

from sft.loss import chunked_cross_entropy_sum, count_supervised, cross_entropy_sum, step_loss
from sft.models import forward_hidden, tiny_model
from sft.packing import collate_rows, pack, pad_collate
from sft.render import Sample
from sft.schema import IGNORE_INDEX

V = 64
PAD = 0


def _samples(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(5, 20, (1,), generator=g))
        ids = torch.randint(1, V, (length,), generator=g).tolist()
        cut = int(torch.randint(1, length - 1, (1,), generator=g))  # prompt, then a supervised reply
        labels = [IGNORE_INDEX] * cut + ids[cut:]
        out.append(Sample(ids, labels))
    return out


def _step(model, micro_batches, chunk=7):
    """Loss and gradients of one optimizer step over ``micro_batches`` (each backprops sum CE / N_step)."""
    model.zero_grad(set_to_none=True)
    n = count_supervised(micro_batches)
    total = 0.0
    for b in micro_batches:
        h, w = forward_hidden(model, b)
        ce = chunked_cross_entropy_sum(h, w, b["targets"], chunk)
        step_loss(ce, n).backward()
        total += float(ce)
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    return total / n, grads


def _assert_same(a, b, tol=1e-5):
    (la, ga), (lb, gb) = a, b
    assert la == pytest.approx(lb, abs=tol)
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], atol=tol, rtol=1e-4, msg=k)


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-mpt"])
def model(request):
    return tiny_model(request.param, V, seed=0).float()


def test_chunked_equals_reference_in_value_and_gradient():
    torch.manual_seed(0)
    h = torch.randn(2, 9, 16, requires_grad=True)
    w = torch.randn(V, 16, requires_grad=True)
    t = torch.randint(0, V, (2, 9))
    t[0, :4] = IGNORE_INDEX
    ref = cross_entropy_sum(h, w, t)
    (gh_ref, gw_ref) = torch.autograd.grad(ref, (h, w))
    for chunk in (1, 4, 5, 100):
        out = chunked_cross_entropy_sum(h, w, t, chunk)
        gh, gw = torch.autograd.grad(out, (h, w))
        assert out.item() == pytest.approx(ref.item(), rel=1e-6)
        torch.testing.assert_close(gh, gh_ref)
        torch.testing.assert_close(gw, gw_ref)


def test_all_masked_micro_batch_gives_zero_loss_and_gradients():
    h = torch.randn(1, 4, 8, requires_grad=True)
    w = torch.randn(V, 8, requires_grad=True)
    t = torch.full((1, 4), IGNORE_INDEX)
    out = chunked_cross_entropy_sum(h, w, t, 2)
    out.backward()
    assert float(out) == 0.0 and torch.count_nonzero(h.grad) == 0 and torch.count_nonzero(w.grad) == 0


def test_count_supervised():
    b1 = {"targets": torch.tensor([[1, IGNORE_INDEX, 3]])}
    b2 = {"targets": torch.tensor([[IGNORE_INDEX, IGNORE_INDEX], [5, 6]])}
    assert count_supervised([b1, b2]) == 4
    assert float(step_loss(torch.tensor(8.0), 4)) == 2.0


def test_packed_rows_equal_unpacked_samples(model):
    samples = _samples()
    packed = collate_rows(pack(samples, 40, PAD))
    assert packed["input_ids"].size(0) < len(samples)  # really packed: several documents per row
    _assert_same(_step(model, [packed]), _step(model, [pad_collate(samples, PAD)]))


def test_accumulation_8x1_equals_2x4(model):
    samples = _samples()
    one = [pad_collate(samples, PAD)]
    four = [pad_collate(samples[i : i + 2], PAD) for i in range(0, 8, 2)]
    _assert_same(_step(model, one), _step(model, four))


def test_loss_is_the_mean_over_all_supervised_tokens(model):
    # reference from plain full logits, sample by sample: sum CE over every reply token / their count
    samples = _samples()
    total, n = 0.0, 0
    with torch.no_grad():
        for s in samples:
            logits = model(torch.tensor([s.input_ids])).logits[0, :-1]
            target = torch.tensor(s.labels[1:])
            total += float(F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum"))
            n += int((target != IGNORE_INDEX).sum())
    loss, _ = _step(model, [pad_collate(samples[:3], PAD), pad_collate(samples[3:], PAD)])
    assert loss == pytest.approx(total / n, abs=1e-5)
