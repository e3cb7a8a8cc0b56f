"""Loss normalisation (mean over the supervised targets of the whole step) and the chunked cross-entropy,
checked on tiny models: packed == unpacked, (micro-batch 8, accum 1) == (2, 4), in loss and gradients."""

import pytest
import torch
import torch.nn.functional as F

from sft.data.packing import collate_rows, pack, pad_collate
from sft.data.render import Sample
from sft.data.schema import IGNORE_INDEX
from sft.model.loss import chunked_cross_entropy_sum, count_supervised, cross_entropy_sum, step_loss
from sft.model.models import forward_hidden, tiny_model

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


# ----------------------------------------------------------------------------- the model's own loss


def _tiny_hf(kind: str):
    """A 2-layer fp32 transformers model whose output head does more than ``h @ W.T`` (except Llama/MPT)."""
    import transformers as tf

    common = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    if kind == "gemma2":  # soft-capping small enough to bend these logits
        cfg = tf.Gemma2Config(**common, head_dim=8, final_logit_softcapping=0.5, sliding_window=64)
    elif kind == "phi":  # lm_head has a bias; randomised below (init makes it zero)
        cfg = tf.PhiConfig(**common)
    elif kind == "cohere":
        cfg = tf.CohereConfig(**common, logit_scale=0.25)
    elif kind == "granite":  # transformers divides by logits_scaling
        cfg = tf.GraniteConfig(**common, logits_scaling=4.0)
    elif kind == "llama":
        cfg = tf.LlamaConfig(**common)
    else:
        cfg = tf.MptConfig(vocab_size=V, d_model=32, n_heads=4, n_layers=2, max_seq_len=64, no_bias=True)
    cfg._attn_implementation = "eager"
    model = tf.AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():
        out = model.get_output_embeddings()
        out.weight.mul_(20.0)  # logits of a few units, so a scale or a cap changes the loss visibly
        if out.bias is not None:
            out.bias.normal_(0.0, 2.0)
    return model


@pytest.mark.parametrize("kind", ["gemma2", "phi", "cohere", "granite", "llama", "mpt"])
def test_chunked_loss_is_the_models_own_loss(kind):
    """Our loss on one unpacked document == transformers' ``model(ids, labels=...).loss`` x N, fp32."""
    model = _tiny_hf(kind)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (1, 24), generator=g)
    labels = ids.clone()
    labels[0, :9] = IGNORE_INDEX  # a prompt
    targets = torch.cat([labels[:, 1:], torch.full((1, 1), IGNORE_INDEX)], dim=1)  # our shift
    batch = {"input_ids": ids, "document_ids": torch.zeros_like(ids, dtype=torch.int32),
             "position_ids": torch.arange(24)[None], "targets": targets}  # fmt: skip
    n = int((targets != IGNORE_INDEX).sum())
    with torch.no_grad():
        theirs = model(input_ids=ids, labels=labels).loss.item()
        h, head = forward_hidden(model, batch)
        ours = chunked_cross_entropy_sum(h, head, targets, 5).item()
        bare = chunked_cross_entropy_sum(h, head.weight, targets, 5).item()
    assert n == 15 and ours == pytest.approx(theirs * n, rel=1e-5, abs=1e-5)
    if kind not in ("llama", "mpt"):  # the bare weight (the old loss) is not the model's loss here
        assert abs(bare - theirs * n) > 0.1 * n


def test_our_mpt_loss_applies_logit_scale():
    from sft.model.mpt import MPTConfig, MPTForCausalLM

    torch.manual_seed(0)
    m = MPTForCausalLM(MPTConfig(d_model=32, n_heads=4, n_layers=2, vocab_size=V, max_seq_len=64,
                                 logit_scale=0.125), attn_impl="sdpa")  # fmt: skip
    m.init_weights(std=0.5)
    ids = torch.randint(0, V, (1, 16))
    t = torch.cat([ids[:, 1:], torch.full((1, 1), IGNORE_INDEX)], dim=1)
    with torch.no_grad():
        theirs = F.cross_entropy(m(ids)[0], t[0], ignore_index=IGNORE_INDEX, reduction="sum").item()
        h, head = forward_hidden(m, {"input_ids": ids, "document_ids": torch.zeros_like(ids)})
        assert head.scale == 0.125
        assert chunked_cross_entropy_sum(h, head, t, 4).item() == pytest.approx(theirs, rel=1e-5)


def test_a_head_the_loss_cannot_apply_is_refused():
    from sft.model.models import ModelError, lm_head

    model = _tiny_hf("mpt")
    model.config.logit_scale = 0.5  # transformers' MPT ignores it: neither choice is safe to train on
    with pytest.raises(ModelError, match=r"^model type 'mpt': .*logit_scale"):
        lm_head(model)
    llama = _tiny_hf("llama")
    llama.config.unpadded_vocab_size = 50
    with pytest.raises(ModelError, match=r"^model type 'llama': .*unpadded_vocab_size"):
        lm_head(llama)


def test_the_trainer_refuses_such_a_model_before_any_run_folder(tmp_path, capsys):
    from sft.config import TrainConfig
    from sft.model.models import byte_tokenizer, tiny_model
    from sft.training import trainer

    tok = byte_tokenizer()
    model = tiny_model("tiny-mpt", len(tok), seed=0, max_len=64)
    model.config.logit_scale = 0.5
    model.save_pretrained(str(tmp_path / "mpt"))
    tok.save_pretrained(str(tmp_path / "mpt"))
    out = tmp_path / "runs"
    argv = [
        f"--model={tmp_path / 'mpt'}",
        "--mpt_impl=hf",
        f"--out_dir={out}",
        "--max_steps=1",
        "--max_len=64",
    ]
    assert trainer.main(TrainConfig(), argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "model type 'mpt'" in err[0] and "logit_scale" in err[0]
    assert not out.exists() or not any(out.iterdir())
