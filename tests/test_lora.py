"""LoRA (sft/model/lora.py): only adapters train; merge == base + adapter; save/load, export and resume round-trip.

Two tiny models: a transformers ``LlamaForCausalLM`` (tied head, GQA) and our MPT (``sft.model.mpt``, SDPA path),
plus transformers' ``MptForCausalLM`` as the loader of what our MPT exports. All fp32 on CPU.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from sft.model import lora
from sft.model.models import forward_hidden

V, T = 64, 16


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny matmuls: one intra-op thread is much faster on the shared 2-core machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_mpt(seed: int = 0):
    from sft.model.mpt import MPTConfig, MPTForCausalLM

    model = MPTForCausalLM(
        MPTConfig(d_model=32, n_heads=4, n_layers=2, vocab_size=V, max_seq_len=64), attn_impl="sdpa"
    )
    model.init_weights(std=0.1, generator=torch.Generator().manual_seed(seed))
    return model.eval()


MAKERS = {"llama": tiny_llama, "mpt": tiny_mpt}


def packed_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Two rows of T=16, each packing documents of lengths (5, 11) and (9, 7); targets shifted per document."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (2, T), generator=g)
    docs, pos = torch.zeros(2, T, dtype=torch.int32), torch.zeros(2, T, dtype=torch.long)
    targets = torch.full((2, T), -100, dtype=torch.long)
    for b, lengths in enumerate([(5, 11), (9, 7)]):
        s = 0
        for d, n in enumerate(lengths):
            docs[b, s : s + n] = d
            pos[b, s : s + n] = torch.arange(n)
            targets[b, s : s + n - 1] = ids[b, s + 1 : s + n]
            s += n
    return {
        "input_ids": ids,
        "targets": targets,
        "position_ids": pos,
        "document_ids": docs,
        "attention_mask": torch.ones(2, T, dtype=torch.long),
    }


def logits(model, batch) -> torch.Tensor:
    h, head = forward_hidden(model, batch)
    return head.logits(h)


def loss_of(model, batch) -> torch.Tensor:
    out = logits(model, batch)
    return F.cross_entropy(out.flatten(0, 1), batch["targets"].flatten(), ignore_index=-100)


def make_optimizer(model):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)


def train(model, opt, steps: int, first_seed: int = 0) -> list[float]:
    model.train()
    losses = []
    for i in range(steps):
        loss = loss_of(model, packed_batch(first_seed + i))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


@functools.cache
def trained(kind: str):
    """A LoRA model of ``kind`` after 3 AdamW steps (dropout 0.1, so dropout runs in training), and the
    base state dict it started from. Cached: several tests read it; none may modify it."""
    model = MAKERS[kind]()
    base = {k: v.detach().clone() for k, v in model.named_parameters()}  # tied head counted once
    lora.apply_lora(model, rank=4, alpha=8, dropout=0.1)
    train(model, make_optimizer(model), 3)
    return model, base


def _base_name(lora_name: str) -> str:
    return lora_name.replace(".base_layer.", ".")


# ----------------------------------------------------------------------------- targets and trainability


def test_default_targets_per_architecture():
    from transformers import MptConfig, MptForCausalLM

    assert lora.default_targets(tiny_llama()) == [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    ]  # fmt: skip
    mpt_names = ["Wqkv", "out_proj", "up_proj", "down_proj"]
    assert lora.default_targets(tiny_mpt()) == mpt_names
    hf_mpt = MptForCausalLM(MptConfig(d_model=32, n_heads=4, n_layers=1, vocab_size=V, no_bias=True))
    assert lora.default_targets(hf_mpt) == mpt_names
    with pytest.raises(ValueError, match="no default LoRA target modules for model type ''"):
        lora.default_targets(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("kind", ["llama", "mpt"])
def test_only_adapter_parameters_train(kind):
    model, base = trained(kind)
    names = dict(model.named_parameters())
    trainable = sorted(n for n, p in names.items() if p.requires_grad)
    # A and B of every targeted linear layer of both blocks, nothing else
    per_block = 7 if kind == "llama" else 4
    assert len(trainable) == 2 * 2 * per_block
    assert all(".lora_A.default." in n or ".lora_B.default." in n for n in trainable)
    # every base parameter (embedding / tied head, norms, frozen linear weights) is bit-exactly unchanged
    frozen = {_base_name(n): p for n, p in names.items() if not p.requires_grad}
    assert sorted(frozen) == sorted(base)
    for n, p in frozen.items():
        assert torch.equal(p, base[n]), n
    # every adapter moved: B starts at zero, so a non-zero B is an update
    for n in trainable:
        if ".lora_B." in n:
            assert names[n].abs().max() > 1e-4, n


def test_adapter_dtype_over_bf16_base():
    model = tiny_mpt().to(torch.bfloat16)
    lora.apply_lora(model, rank=2, alpha=4, adapter_dtype=torch.float32)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if "lora_" not in n} == {torch.bfloat16}
    h, w = forward_hidden(model, packed_batch())
    assert h.dtype == torch.bfloat16 and h.shape == (2, T, 32)


def test_refusals():
    model = tiny_mpt()
    with pytest.raises(ValueError, match="no LoRA adapters"):
        lora.lora_state_dict(model)
    lora.apply_lora(model, rank=2)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        lora.apply_lora(model, rank=2)
    sd = lora.lora_state_dict(model)
    key = "transformer.blocks.0.attn.Wqkv.lora_A.weight"
    assert key in sd and sd[key].shape == (2, 32)
    with pytest.raises(ValueError, match="missing"):
        lora.load_lora_state_dict(model, {k: v for k, v in sd.items() if k != key})
    with pytest.raises(ValueError, match="merge_lora"):
        lora.save_merged(model, "/nonexistent")


# ----------------------------------------------------------------------------- packing, checkpointing


@pytest.mark.parametrize("kind", ["llama", "mpt"])
def test_packed_rows_equal_documents_alone(kind):
    model, _ = trained(kind)
    batch = packed_batch(5)
    with torch.no_grad():
        packed = logits(model, batch)
        s = 0
        for n in (5, 11):  # row 0's documents, each run alone as a row of its own
            alone = {k: v[:1, s : s + n] for k, v in batch.items()}
            alone["document_ids"] = torch.zeros_like(alone["document_ids"])
            torch.testing.assert_close(packed[0, s : s + n], logits(model, alone)[0], atol=1e-5, rtol=0)
            s += n


def _lora_grads(model, batch) -> dict[str, torch.Tensor | None]:
    model.train()
    loss_of(model, batch).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    model.eval()
    return grads


@pytest.mark.parametrize("input_grads", [True, False])
def test_reentrant_checkpointing_needs_input_grads(input_grads):
    """The classic pitfall: frozen embeddings + reentrant checkpointing = no gradient for the adapters.
    Checkpointing is switched on below transformers' public API, which would add its own input hook."""
    from torch.utils.checkpoint import checkpoint

    model = tiny_llama()
    lora.apply_lora(model, rank=4, alpha=8, dropout=0.0, input_grads=input_grads)
    torch.nn.init.normal_(model.model.layers[0].self_attn.q_proj.lora_B.default.weight)  # non-zero B
    batch = packed_batch(1)
    plain = _lora_grads(model, batch)
    model._set_gradient_checkpointing(True, functools.partial(checkpoint, use_reentrant=True))
    if input_grads:
        ckpt = _lora_grads(model, batch)
        for n, g in plain.items():
            torch.testing.assert_close(ckpt[n], g, atol=1e-6, rtol=0, msg=n)
    else:
        # the pitfall, shown to be real: every block is checkpointed and nothing upstream needs a gradient,
        # so the loss is cut off from all adapters
        with pytest.warns(UserWarning, match="None of the inputs have requires_grad=True"):
            with pytest.raises(RuntimeError, match="does not require grad"):
                _lora_grads(model, batch)


def test_fast_mpt_checkpointing_gives_same_adapter_grads():
    model = tiny_mpt()
    lora.apply_lora(model, rank=4, alpha=8, dropout=0.0)
    for m in model.modules():
        if hasattr(m, "lora_B"):
            torch.nn.init.normal_(m.lora_B.default.weight, std=0.1)
    batch = packed_batch(2)
    plain = _lora_grads(model, batch)
    model.gradient_checkpointing = True
    ckpt = _lora_grads(model, batch)
    assert set(plain) == set(ckpt) and all(g is not None for g in plain.values())
    for n, g in plain.items():
        torch.testing.assert_close(ckpt[n], g, atol=1e-6, rtol=0, msg=n)


# ----------------------------------------------------------------------------- merge, save, export, resume


@pytest.mark.parametrize("kind", ["llama", "mpt"])
def test_merge_equals_base_plus_adapter(kind):
    model, _ = trained(kind)
    batch = packed_batch(7)
    with torch.no_grad():
        adapted = logits(model, batch)
    merged = MAKERS[kind]()
    lora.load_adapter(merged, _saved_adapter(kind))
    lora.merge_lora(merged)
    assert not lora.is_lora(merged) and not hasattr(merged, "peft_config")
    assert sorted(merged.state_dict()) == sorted(MAKERS[kind]().state_dict())
    with torch.no_grad():
        out = logits(merged, batch)
        base_out = logits(MAKERS[kind](), batch)
    torch.testing.assert_close(out, adapted, atol=1e-5, rtol=0)
    assert (out - base_out).abs().max() > 1e-3  # the adapter did change the function


@functools.cache
def _saved_adapter(kind: str):
    import tempfile

    model, _ = trained(kind)
    return lora.save_adapter(model, tempfile.mkdtemp(prefix=f"lora_{kind}_"))


@pytest.mark.parametrize("kind", ["llama", "mpt"])
def test_save_adapter_reload_is_identical(kind):
    import json

    from safetensors.torch import load_file

    model, _ = trained(kind)
    folder = _saved_adapter(kind)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"]) == ("LORA", 4, 8, 0.1)
    keys = load_file(str(folder / "adapter_model.safetensors")).keys()
    assert len(keys) == len(lora.lora_state_dict(model))
    assert all(k.startswith("base_model.model.") and ".default." not in k for k in keys)
    reloaded = lora.load_adapter(MAKERS[kind](), folder).eval()
    batch = packed_batch(3)
    with torch.no_grad():
        assert torch.equal(logits(reloaded, batch), logits(model, batch))


def test_adapter_loads_with_peft_from_pretrained():
    from peft import PeftModel

    model, _ = trained("llama")
    peft_model = PeftModel.from_pretrained(tiny_llama(), str(_saved_adapter("llama"))).eval()
    ids = packed_batch(4)["input_ids"]
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        theirs = peft_model(input_ids=ids).logits
    assert torch.equal(ours, theirs)


def test_fast_mpt_adapter_loads_into_transformers_mpt():
    """Same module names: an adapter trained on our MPT is a peft adapter for transformers' MptForCausalLM."""
    from peft import PeftModel

    from sft.model.mpt import save_hf

    model, base = trained("mpt")
    import tempfile

    base_dir = tempfile.mkdtemp(prefix="mpt_base_")
    save_hf(tiny_mpt(), base_dir)
    from transformers import MptForCausalLM

    hf = PeftModel.from_pretrained(
        MptForCausalLM.from_pretrained(base_dir), str(_saved_adapter("mpt"))
    ).eval()
    ids = packed_batch(6)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, model(ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["llama", "mpt"])
def test_merge_and_export_loads_in_transformers(kind, tmp_path):
    from transformers import AutoModelForCausalLM, MptForCausalLM

    from sft.model.models import byte_tokenizer

    model, _ = trained(kind)
    ids = packed_batch(8)["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=ids).logits if kind == "llama" else model(ids)
    copy = lora.load_adapter(MAKERS[kind](), _saved_adapter(kind))  # merge a copy: `trained` is shared
    out = lora.merge_and_export(copy, byte_tokenizer(), tmp_path / "final")
    assert (out / "tokenizer.json").is_file() and not (out / "adapter_config.json").exists()
    loaded = (AutoModelForCausalLM if kind == "llama" else MptForCausalLM).from_pretrained(str(out)).eval()
    assert not any("lora" in k or "base_layer" in k for k in loaded.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["llama", "mpt"])
def test_resume_from_adapter_state_is_identical(kind):
    model = MAKERS[kind]()
    lora.apply_lora(model, rank=4, alpha=8, dropout=0.0)
    opt = make_optimizer(model)
    train(model, opt, 2)
    saved = lora.lora_state_dict(model)
    saved_opt = {
        "state": {k: {n: t.clone() for n, t in v.items()} for k, v in opt.state_dict()["state"].items()}
    }
    saved_opt["param_groups"] = opt.state_dict()["param_groups"]
    straight = train(model, opt, 2, first_seed=2)
    final = lora.lora_state_dict(model)

    # a fresh process: base from its source, new (differently initialised) adapters, then the checkpoint
    torch.manual_seed(123)
    resumed = lora.apply_lora(MAKERS[kind](), rank=4, alpha=8, dropout=0.0)
    lora.load_lora_state_dict(resumed, saved)
    opt2 = make_optimizer(resumed)
    opt2.load_state_dict(saved_opt)
    again = train(resumed, opt2, 2, first_seed=2)
    assert again == straight
    after = lora.lora_state_dict(resumed)
    assert after.keys() == final.keys()
    assert all(torch.equal(after[k], final[k]) for k in final)


# ----------------------------------------------------------------------------- QLoRA (torchao NF4 base)


def _nf4_mpt(device="cpu", dtype=torch.float32, d=128, layers=2):
    from sft.model.mpt import MPTConfig, MPTForCausalLM

    model = MPTForCausalLM(MPTConfig(d_model=d, n_heads=4, n_layers=layers, vocab_size=V, max_seq_len=64))
    model.init_weights(std=0.05, generator=torch.Generator().manual_seed(0))
    return model.to(device=device, dtype=dtype)


def test_qlora_nf4_base_trains_adapters_and_merges():
    pytest.importorskip("torchao")
    model = _nf4_mpt()
    model.attn_impl = "sdpa"
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    lora.quantize_nf4(model)
    wqkv = model.transformer.blocks[0].attn.Wqkv.weight
    assert type(wqkv).__name__ == "NF4Tensor" and wqkv.dtype == torch.float32
    dequant = wqkv.get_original_weight()
    err = (dequant - dense["transformer.blocks.0.attn.Wqkv.weight"]).abs()
    assert 0 < err.max() < 0.05  # 4-bit: lossy, close
    lora.apply_lora(model, rank=4, alpha=8, dropout=0.0)
    losses = train(model, make_optimizer(model), 4)
    assert losses[-1] < losses[0]
    assert torch.equal(model.transformer.blocks[0].attn.Wqkv.base_layer.weight.get_original_weight(), dequant)
    assert torch.equal(model.transformer.wte.weight, dense["transformer.wte.weight"])  # not quantized
    batch = packed_batch(9)
    with torch.no_grad():
        adapted = logits(model, batch)
        lora.merge_lora(model)
        merged = logits(model, batch)
    assert type(model.transformer.blocks[0].attn.Wqkv.weight) is torch.nn.Parameter
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=0)


@pytest.mark.gpu
def test_qlora_nf4_on_cuda_bf16():
    """QLoRA as used on the GPU: bf16 NF4 base, fp32 adapters, FlexAttention, activation checkpointing."""
    pytest.importorskip("torchao")
    torch.manual_seed(0)
    model = _nf4_mpt("cuda", torch.bfloat16, d=1024, layers=4)
    batch = {k: v.cuda() for k, v in packed_batch(0).items()}
    lora.quantize_nf4(model)
    lora.apply_lora(model, rank=16, alpha=32, dropout=0.05, adapter_dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        untrained = logits(model, batch).float()  # B = 0: the base model's logits
    model.gradient_checkpointing = True
    model.train()
    opt = make_optimizer(model)
    losses = []
    for _ in range(5):
        loss = loss_of(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        adapted = logits(model, batch).float()
        lora.merge_lora(model)
        merged = logits(model, batch).float()
    assert model.transformer.blocks[0].attn.Wqkv.weight.dtype == torch.bfloat16
    # The bound, from bf16 arithmetic (the fixed atol=0.05 it replaces failed on an H100 with 0.125, 2026-12-07):
    # - both paths round each logit to bf16 (8 significant bits): they may differ by one ulp of the logit,
    #   up to 2^-7 |z| (0.125 is exactly one ulp for a logit in [16, 32); these logits reach ~23): rtol 2^-7;
    # - the merged weights W + (alpha/r) B A are rounded to bf16 (2^-9 relative each) where the adapted path
    #   adds an fp32 adapter output: through 16 matrices of 1,024 inputs that is ~sqrt(16) * 2^-9 / sqrt(3),
    #   ~0.5% of the logits' scale in rms (measured on CPU in bf16: rms 0.013 for a logit std of 4.4); the
    #   max over 2 x 16 x V logits stays within 2^-5 (3%) of that scale.
    # Teeth: the adapters moved the logits by far more than the bound (CPU: max 23.9, rms 4.7), so a merge that
    # drops or mis-scales them fails.
    atol = 2**-5 * adapted.std().item()
    assert (adapted - untrained).abs().max() > 20 * atol
    torch.testing.assert_close(merged, adapted, atol=atol, rtol=2**-7)


# ----------------------------------------------------------------------------- through the trainer


def _recipe_main(*args) -> int:
    """The SmolLM2 recipe's real entry point, in process (``--smoke``: tiny random Llama, bundled data)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "sft" / "train_smollm2_guanaco.py"
    spec = importlib.util.spec_from_file_location("_recipe_smollm2", path)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)  # its __main__ block does not run
    from sft.training.trainer import main

    return main(recipe.DEFAULTS, list(args), smoke=recipe.SMOKE)


LORA_ARGS = ["--smoke", "--lora", "--no-progress", "--device=cpu", "--save_every=1", "--keep_last=3"]


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory):
    """An uninterrupted LoRA run (3 steps) and one stopped after step 1 then resumed, in one out_dir."""
    import os

    out = tmp_path_factory.mktemp("lora_runs")
    old = os.environ.get("SFT_CACHE")
    os.environ["SFT_CACHE"] = str(out / "cache")
    try:
        assert _recipe_main(*LORA_ARGS, f"--out_dir={out}", "--run_name=full") == 0
        assert _recipe_main(*LORA_ARGS, f"--out_dir={out}", "--run_name=cut", "--stop_after=1") == 0
        assert _recipe_main(f"--resume={out / 'cut'}", f"--out_dir={out}", "--no-progress") == 0
    finally:
        if old is None:
            os.environ.pop("SFT_CACHE", None)
        else:
            os.environ["SFT_CACHE"] = old
    return out / "full", out / "cut"


def _train_losses(run_dir):
    from sft.training.runs import read_metrics

    return [(r["step"], r["loss"]) for r in read_metrics(run_dir) if "loss" in r]


def test_trainer_lora_checkpoints_hold_only_adapters(lora_runs):
    import json

    from safetensors import safe_open

    full, _ = lora_runs
    ckpts = sorted(p.name for p in (full / "checkpoints").iterdir())
    assert ckpts == ["step_0000001", "step_0000002", "step_0000003"]
    with safe_open(str(full / "checkpoints" / "step_0000003" / "model.safetensors"), "pt") as f:
        keys = sorted(f.keys())
    # tiny-llama: 2 layers x 7 linear layers (q,k,v,o,gate,up,down) x (A, B)
    assert len(keys) == 28 and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    assert "model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    info = json.loads((full / "config.json").read_text())
    assert info["config"]["lora"] is True and info["config"]["lora_rank"] == 16
    # r * (in + out) summed over the targeted layers of the d=64, ffn=128, 4 heads / 2 kv-heads model
    per_layer = 16 * ((64 + 64) + (64 + 32) + (64 + 32) + (64 + 64) + 2 * (64 + 128) + (128 + 64))
    assert info["model"]["n_trainable"] == 2 * per_layer
    from sft.training.runs import read_metrics

    train = [r for r in read_metrics(full) if "loss" in r]
    assert len(train) == 3 and all(r["mfu"] is None for r in train)  # null with LoRA (and on CPU)


def test_trainer_lora_adapter_plus_base_reproduces_final(lora_runs):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from sft.model.models import tiny_model, tiny_tokenizer

    full, _ = lora_runs
    final = AutoModelForCausalLM.from_pretrained(str(full / "final")).eval()
    base = tiny_model("tiny-llama", len(tiny_tokenizer()), seed=0, max_len=256).eval()
    # everything LoRA does not target (embeddings, norms) is the base's init, bit for bit
    final_sd, base_sd = load_file(str(full / "final" / "model.safetensors")), base.state_dict()
    untouched = [k for k in final_sd if not k.endswith(tuple(f"{t}.weight" for t in lora._LLAMA_LIKE))]
    assert untouched and all(torch.equal(final_sd[k], base_sd[k]) for k in untouched)
    # the targeted weights changed (the adapters trained) ...
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(final_sd[q], base_sd[q])
    # ... by exactly the adapter: base + adapter/ computes what final/ computes
    adapted = lora.load_adapter(base, full / "adapter").eval()
    x = torch.tensor([[257, 84, 82, 68, 81, 198, 71, 72, 258]])
    with torch.no_grad():
        torch.testing.assert_close(final(x).logits, adapted(x).logits, atol=1e-5, rtol=0)


def test_trainer_lora_resume_gives_identical_losses(lora_runs):
    full, cut = lora_runs
    got, want = _train_losses(cut), _train_losses(full)
    assert [s for s, _ in want] == [1, 2, 3]
    assert got == want  # bit-exact on CPU: stop after 1 + resume == uninterrupted


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--qlora"], "error: --qlora needs --lora (QLoRA trains adapters on the 4-bit base)"),
        (["--lora", "--lora_targets=q_proj,,v_proj"], "error: --lora_targets=q_proj,,v_proj: expected"),
        (["--lora", "--lora_targets=no_such_proj"], "error: --lora: "),
        (
            ["--lora", "--distributed"],
            "error: --lora with FSDP2 (torchrun / --distributed) is not supported yet",
        ),
    ],
)
def test_trainer_lora_bad_settings_are_one_line_errors(args, message, tmp_path, capsys):
    rc = _recipe_main("--smoke", "--no-progress", f"--out_dir={tmp_path}/runs", *args)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith(message), err
    assert not (tmp_path / "runs").exists() or not [p for p in (tmp_path / "runs").iterdir()]


def test_trainer_qlora_without_torchao_is_a_config_error(tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("torchao") is not None:
        pytest.skip("torchao is installed")
    rc = _recipe_main("--smoke", "--no-progress", "--lora", "--qlora", f"--out_dir={tmp_path}/runs")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [
        "error: --qlora needs the torchao package (pip install torchao==0.18.0 for torch 2.11); or train plain --lora"
    ]
