"""The one training engine (sft/training/engine.py) and the memory plan (sft/training/memory.py): attention backends agree,
per-block checkpointing and the in-backward step change no number, the estimate matches the committed GPU
peaks, and what cannot run is refused in one line before the run folder exists."""

import dataclasses
import json

import pytest
import torch

from sft.config import ConfigError, TrainConfig, parse_args
from sft.data.batches import MicroBatches
from sft.data.packing import collate_rows, pack
from sft.data.render import Sample
from sft.model.models import forward_hidden
from sft.model.mpt import MPTConfig, MPTForCausalLM
from sft.training import engine
from sft.training.memory import Workload, estimate_memory, plan_memory

GIB = 2**30


def _recipe(name: str):
    """``(DEFAULTS, SMOKE)`` of ``sft/<name>.py`` (its import sets sys.path[0]: restored here)."""
    import importlib.util
    import sys

    from tests.conftest import REPO

    saved = list(sys.path)
    try:
        spec = importlib.util.spec_from_file_location(name, REPO / "sft" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path[:] = saved
    return mod.DEFAULTS, mod.SMOKE


def _packed_batch(vocab: int, seed: int = 0) -> dict:
    """Two rows of 64 tokens, each packing several documents of different lengths (and a padding tail)."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for n in (23, 17, 30, 9, 12, 40):
        ids = torch.randint(4, vocab, (n,), generator=g).tolist()
        samples.append(Sample(ids, ids))
    rows = pack(samples, 64, 0)
    return rows if isinstance(rows, dict) else collate_rows(list(rows))


def _hf_model(kind: str):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    common = dict(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**common)).eval()
    return Qwen2ForCausalLM(Qwen2Config(**common)).eval()


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_flex_blockmask_equals_sdpa_mask_for_transformers_models(kind):
    """The same packed rows through transformers' flex_attention (our BlockMask passed through) and through
    SDPA with the materialised document mask: fp32 hidden states equal to 1e-5."""
    model = _hf_model(kind)
    batch = _packed_batch(97)
    assert int(batch["document_ids"].max()) >= 2  # several documents per row
    out = {}
    for backend in ("sdpa", "flex"):
        engine.set_attention(model, backend)
        with torch.no_grad():
            out[backend] = forward_hidden(model, batch)[0]
    assert model.config._attn_implementation == "flex_attention"
    torch.testing.assert_close(out["flex"], out["sdpa"], atol=1e-5, rtol=1e-5)


def test_flex_equals_sdpa_for_our_mpt_packed():
    torch.manual_seed(0)
    model = MPTForCausalLM(
        MPTConfig(d_model=64, n_heads=4, n_layers=2, vocab_size=97, max_seq_len=128)
    ).eval()
    model.init_weights()
    batch = _packed_batch(97, seed=1)
    out = {}
    for impl in ("sdpa", "flex_eager"):
        model.attn_impl = impl
        with torch.no_grad():
            out[impl] = forward_hidden(model, batch)[0]
    torch.testing.assert_close(out["flex_eager"], out["sdpa"], atol=1e-5, rtol=1e-5)


def test_flash_attention_branch_flattens_the_micro_batch(monkeypatch):
    """flash_attention_2 finds documents from position_ids only for one row: the micro-batch goes in as
    [1, B*T] with per-document positions, and the rows come back in their shape."""
    model = _hf_model("llama")
    batch = _packed_batch(97)
    seen = {}

    def fake_base(input_ids, position_ids, use_cache, **kw):
        seen["ids"], seen["pos"], seen["kw"] = input_ids, position_ids, kw
        return type("O", (), {"last_hidden_state": torch.zeros(*input_ids.shape, 64)})()

    model.config._attn_implementation = "flash_attention_2"
    monkeypatch.setattr(type(model), "base_model", property(lambda self: fake_base))
    h, _ = forward_hidden(model, batch)
    B, T = batch["input_ids"].shape
    assert seen["ids"].shape == (1, B * T) and "attention_mask" not in seen["kw"]
    assert torch.equal(seen["pos"], batch["position_ids"].reshape(1, -1))
    assert h.shape == (B, T, 64)


def test_first_n_blocks_checkpointed_give_the_same_grads():
    """Checkpointing blocks 0..N-1 of a transformers Llama (per layer, not all-or-nothing) leaves the
    gradients as they are, and only those layers are marked."""
    batch = _packed_batch(97)
    grads = {}
    for n in (0, 1, 2):
        model = _hf_model("llama").train()
        engine.set_attention(model, "sdpa")
        engine.set_checkpoint_blocks(model, n)
        layers = model.model.layers
        # the checkpoint sits in each marked layer's own forward; transformers' flag stays off
        assert ["forward" in vars(layer) for layer in layers] == [i < n for i in range(2)]
        assert not any(layer.gradient_checkpointing for layer in layers)
        ce = engine.ce_sum(model, batch)
        ce.backward()
        grads[n] = torch.cat([p.grad.flatten() for p in model.parameters()])
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grads[2], grads[0], atol=1e-6, rtol=1e-5)


def test_micro_batches_are_always_full():
    """5 rows, micro-batches of 2: the third micro-batch of epoch 0 takes one row of epoch 1's order, so the
    compiled blocks never see a shorter batch; the stream is the concatenation of the epochs' orders."""
    rows = {"input_ids": torch.arange(5)[:, None].repeat(1, 4)}
    cfg = TrainConfig(micro_batch=2, seed=3)
    mb = MicroBatches(rows, cfg)
    stream = torch.cat([mb.order(0), mb.order(1), mb.order(2)]).tolist()
    got = [mb[i]["input_ids"][:, 0].tolist() for i in range(7)]
    assert all(len(g) == 2 for g in got)
    assert sum(got, []) == stream[:14]
    assert mb.per_epoch == 2.5


def _mpt7b(on="meta"):
    with torch.device(on):
        cfg = MPTConfig(
            d_model=4096, n_heads=32, n_layers=32, expansion_ratio=4, vocab_size=50432, max_seq_len=2048
        )
        return MPTForCausalLM(cfg).to(torch.bfloat16)


# committed H200 peaks (GiB), MPT-7B shape, rows of 2,048: benchmarks/train_throughput.py rows of
# runs/2026-11-30_h200_mpt7b_train_throughput_2 and the recipe run runs/20261130-062524_mpt-7b-random_guanaco-1k
COMMITTED = [
    # (micro_batch, grad_accum, optimizer, checkpointed blocks, in backward, measured peak GiB)
    (2, 1, "adamw_bf16", 0, False, 54.52),
    (4, 1, "adamw_bf16", 0, False, 70.66),
    (6, 1, "adamw_bf16", 0, False, 86.79),
    (8, 1, "adamw_bf16", 0, False, 102.93),
    (8, 1, "adamw_bf16", 8, False, 87.91),
    (4, 1, "adamw_kahan", 16, False, 68.03),
    (4, 1, "adamw_kahan", 8, True, 75.54),
    (4, 4, "adamw_kahan", 0, False, 95.36),
    (4, 4, "adamw_kahan", 20, False, 76.59),  # runs/2026-12-02_h200_engine_1: the recipe, 80 GB profile
]


def test_committed_peaks_are_in_the_files():
    """The table above is what the committed files say (so the estimate test cannot drift from them)."""
    from tests.conftest import REPO

    rows = json.loads(
        (REPO / "runs/2026-11-30_h200_mpt7b_train_throughput_2/train_throughput.json").read_text()
    )
    peaks = {c["name"]: round(c["peak_alloc_gib"], 2) for c in rows["configs"] if "peak_alloc_gib" in c}
    assert peaks["ours_rows2"] == 54.52 and peaks["ours_rows8"] == 102.93 and peaks["ours_rows8_ck8"] == 87.91
    assert peaks["80gb_kahan"] == 68.03 and peaks["80gb_kahan_inbwd"] == 75.54
    last = (REPO / "runs/20261130-062524_mpt-7b-random_guanaco-1k/metrics.jsonl").read_text().splitlines()
    assert max(json.loads(line).get("peak_mem_gib") or 0 for line in last) == pytest.approx(95.36, abs=0.01)
    engine_1 = json.loads((REPO / "runs/2026-12-02_h200_engine_1/train_throughput.json").read_text())
    mpt76 = next(c for c in engine_1["configs"] if c["name"] == "mpt76")
    assert round(mpt76["peak_mem_gib"], 2) == 76.59 and mpt76["resolved"]["checkpoint_blocks"] == 20


@pytest.mark.parametrize("mb,accum,opt,n_ck,inbwd,measured", COMMITTED)
def test_memory_estimate_within_10_percent_of_committed_peaks(mb, accum, opt, n_ck, inbwd, measured):
    model = _mpt7b()
    cfg = TrainConfig(micro_batch=mb, grad_accum=accum, optimizer=opt, max_len=2048, precision="bf16")
    est = estimate_memory(model, Workload.of(cfg), autocast=False, checkpoint_blocks=n_ck, in_backward=inbwd)
    assert est["total"] / GIB == pytest.approx(measured, rel=0.10)


def test_auto_plan_picks_the_fewest_checkpointed_blocks_that_fit():
    """MPT-7B, the recipe (4 rows x 4 micro-batches, adamw_kahan): the whole H200 needs no checkpointing;
    the 80 GB profile checkpoints the fewest blocks under 76 GiB; a 40 GiB limit is refused in one line."""
    model = _mpt7b()
    cuda = torch.device("cuda")
    # the checkpointing rule alone (tests/test_memory_plan.py pins the micro-batch split)
    base = dict(
        micro_batch=4, grad_accum=4, optimizer="adamw_kahan", precision="bf16", max_len=2048, plan_split="off"
    )
    whole = plan_memory(model, TrainConfig(**base, memory_limit_gib=139), cuda, autocast=False)
    assert whole.checkpoint_blocks == 0 and not whole.in_backward
    p80 = plan_memory(model, TrainConfig(**base, memory_limit_gib=76), cuda, autocast=False)
    assert 0 < p80.checkpoint_blocks < 32 and p80.estimate["total"] <= 76 * GIB
    fewer = estimate_memory(
        model, Workload.of(TrainConfig(**base)), False, checkpoint_blocks=p80.checkpoint_blocks - 1
    )
    assert fewer["total"] > 76 * GIB  # one block fewer would not fit
    with pytest.raises(ConfigError, match=r"even with the most economical plan, 40.0 GiB --memory_limit_gib"):
        plan_memory(model, TrainConfig(**base, memory_limit_gib=40), cuda, autocast=False)
    # where it is allowed (one micro-batch, no clipping) the in-backward step is used when it is needed
    ib = plan_memory(
        model,
        TrainConfig(**{**base, "grad_accum": 1}, grad_clip=0, memory_limit_gib=76),
        cuda,
        autocast=False,
    )
    plain = plan_memory(
        model, TrainConfig(**{**base, "grad_accum": 1}, memory_limit_gib=76), cuda, autocast=False
    )
    assert ib.checkpoint_blocks <= plain.checkpoint_blocks


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["--optimizer_in_backward=true"],
            "--optimizer_in_backward=true is not possible with --grad_accum=2",
        ),
        (["--attention=flex"], "--attention=flex: FlexAttention has no backward on CPU"),
        (["--memory_limit_gib=0.0001"], "this run needs"),
        (["--checkpoint_blocks=x"], "--checkpoint_blocks=x: expected 'auto' or a number"),
    ],
)
def test_refusals_are_one_line_before_the_run_folder(tmp_path, capsys, args, message):
    from sft.training.trainer import main

    DEFAULTS, SMOKE = _recipe("train_llama_guanaco")
    rc = main(DEFAULTS, ["--smoke", f"--out_dir={tmp_path}", "--progress=false", *args], smoke=SMOKE)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert list(tmp_path.iterdir()) == []


def test_hf_mpt_refuses_flex_and_sdpa(tmp_path, capsys):
    from sft.training.trainer import main

    DEFAULTS, SMOKE = _recipe("train_mpt_guanaco")

    rc = main(
        DEFAULTS, ["--smoke", "--mpt_impl=hf", "--attention=sdpa", f"--out_dir={tmp_path}"], smoke=SMOKE
    )
    err = capsys.readouterr().err
    assert rc == 2 and "transformers' MPT has eager attention only" in err
    assert list(tmp_path.iterdir()) == []


def test_optimizer_in_backward_equals_the_ordinary_step():
    """adamw_kahan with fp32 moments: stepping each parameter inside backward gives bit-identical weights
    and losses to the ordinary step (one micro-batch, no clipping), over 3 steps on bf16 weights."""
    from sft.training.optim import build_optimizer

    batch = _packed_batch(97)
    result = {}
    for inbwd in (False, True):
        torch.manual_seed(0)
        model = MPTForCausalLM(MPTConfig(d_model=64, n_heads=4, n_layers=2, vocab_size=97, max_seq_len=128))
        model.init_weights()
        model.to(torch.bfloat16).train()
        params = list(model.parameters())
        opt = build_optimizer(params, "adamw_kahan", lr=1e-2, moment_dtype=torch.float32)
        cfg = TrainConfig(grad_clip=0.0, precision="bf16", optimizer="adamw_kahan")
        cpu = torch.device("cpu")
        resolved = dataclasses.replace(engine.resolve(model, cfg, cpu), in_backward=inbwd)
        eng = engine.Engine(model, params, opt, resolved, cpu)
        losses = [eng.step([batch], lr=1e-2).loss for _ in range(3)]
        result[inbwd] = (losses, torch.cat([p.detach().float().flatten() for p in params]))
    assert result[True][0] == result[False][0]
    assert torch.equal(result[True][1], result[False][1])


def test_resolved_engine_settings_in_config_json(tmp_path):
    from sft.training.trainer import main

    DEFAULTS, SMOKE = _recipe("train_llama_guanaco")

    rc = main(
        DEFAULTS,
        ["--smoke", f"--out_dir={tmp_path}", "--progress=false", "--run_name=r", "--num_samples=0"],
        smoke=SMOKE,
    )
    assert rc == 0
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert cfg["config"]["resolved"] == {
        "attention": "sdpa",
        "compile": False,
        "checkpoint_blocks": 0,
        "selective_blocks": 0,
        "offload_blocks": 0,
        "fp8": "none",
        "fp8_linears": 0,
        "optimizer_in_backward": False,
        "optimizer_offload": False,
        "plan_why": "",
        "asked": {"optimizer": "adamw", "micro_batch": 2, "grad_accum": 2},
    }


def test_compile_auto_is_off_on_cpu_and_on_for_the_llama_family_on_cuda():
    model = _hf_model("llama")
    cfg = parse_args([])
    assert engine.resolve_compile(model, cfg, torch.device("cpu")) is False
    assert engine.resolve_compile(model, cfg, torch.device("cuda")) is True
    assert engine.resolve_compile(model, parse_args(["--compile=false"]), torch.device("cuda")) is False
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    assert engine.resolve_compile(gpt2, cfg, torch.device("cuda")) is False


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["llama", "qwen2", "mpt"])
def test_gpu_compiled_flex_equals_sdpa_forward_and_backward(kind):
    """On the GPU, fp32: blocks compiled one by one with FlexAttention (our BlockMask) against SDPA with the
    materialised mask, packed rows of several documents: hidden states to 1e-4, gradients to 1e-3 relative
    (the flex kernel accumulates in another order than SDPA's)."""
    batch = {k: v.cuda() for k, v in _packed_batch(97, seed=2).items()}
    out = {}
    for backend in ("sdpa", "flex"):
        torch.manual_seed(0)
        if kind == "mpt":
            model = MPTForCausalLM(
                MPTConfig(d_model=64, n_heads=4, n_layers=2, vocab_size=97, max_seq_len=128)
            )
            model.init_weights()
        else:
            model = _hf_model(kind)
        model.cuda().train()
        engine.set_attention(model, backend)
        if backend == "flex":
            engine.compile_blocks(model)
        ce = engine.ce_sum(model, batch)
        ce.backward()
        out[backend] = (float(ce), torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert out["flex"][0] == pytest.approx(out["sdpa"][0], rel=1e-4)
    g_flex, g_sdpa = out["flex"][1], out["sdpa"][1]
    assert float((g_flex - g_sdpa).norm() / g_sdpa.norm()) < 1e-3


@pytest.mark.parametrize(
    "max_len,mb,accum,n_ck,measured",
    [(2048, 4, 4, 0, 112.13), (32768, 1, 1, 17, 132.10)],  # runs/2026-12-02_h200_engine_3 (Llama recipe, 32k)
)
def test_memory_estimate_of_the_llama_3_8b_shape_within_10_percent(max_len, mb, accum, n_ck, measured):
    from transformers import LlamaConfig, LlamaForCausalLM

    from sft.model.models import RANDOM_PRESETS
    from tests.conftest import REPO

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**RANDOM_PRESETS["llama-3-8b"][1])).to(torch.bfloat16)
    cfg = TrainConfig(
        micro_batch=mb, grad_accum=accum, max_len=max_len, optimizer="adamw_kahan", precision="bf16"
    )
    est = estimate_memory(model, Workload.of(cfg), autocast=False, checkpoint_blocks=n_ck)
    assert est["total"] / GIB == pytest.approx(measured, rel=0.10)
    name = "llama_recipe" if max_len == 2048 else "llama32k"
    lines = (REPO / f"runs/2026-12-02_h200_engine_3/runs/{name}/metrics.jsonl").read_text().splitlines()
    assert max(json.loads(x).get("peak_mem_gib") or 0 for x in lines) == pytest.approx(measured, abs=0.01)


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["--model=random:llama-3-8b", "--tokenizer="],
            "is a random-init shape without a tokenizer: give --tokenizer",
        ),
        (
            ["--model=random:gpt-9", "--tokenizer=x.json"],
            "unknown random preset 'random:gpt-9' (have: mpt-7b, ",
        ),
    ],
)
def test_random_presets_refuse_bad_input_in_one_line(tmp_path, capsys, args, message):
    """A random-init shape needs a tokenizer and a known name: one line, exit 2, no run folder (and no 8B
    model is built first)."""
    from sft.training.trainer import main

    DEFAULTS, SMOKE = _recipe("train_llama_guanaco")
    rc = main(DEFAULTS, [*args, f"--out_dir={tmp_path}", "--progress=false", "--data=bundled"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_random_preset_tokenizer_larger_than_the_embedding_is_refused(tmp_path, capsys, shared_data):
    """The tiny random Llama has 50,432 rows: the NeoX tokenizer (50,277 + specials) fits; a head smaller than
    the tokenizer would index out of range, so it is refused by name."""
    from sft.model import models
    from sft.training.trainer import main

    DEFAULTS, SMOKE = _recipe("train_llama_guanaco")
    tok = shared_data / "gpt-neox-20b-tokenizer.json"
    small = dict(models.RANDOM_PRESETS)
    small["tiny-llama"] = ("LlamaConfig", {**small["tiny-llama"][1], "vocab_size": 1000})
    args = ["--model=random:tiny-llama", f"--tokenizer={tok}", f"--out_dir={tmp_path}", "--data=bundled"]
    import unittest.mock

    with unittest.mock.patch.object(models, "RANDOM_PRESETS", small):
        rc = main(DEFAULTS, args)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [
        f"error: model 'random:tiny-llama' has 1000 token embeddings; the tokenizer has {len(models.load_tokenizer(str(tok)))}"
    ]
    assert list(tmp_path.iterdir()) == []
