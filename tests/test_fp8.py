"""--fp8 (sft/model/fp8.py): refusals, the layers converted, and FP8 numerics against bf16/fp32.

Tolerances of the numerics tests. e4m3 keeps 3 mantissa bits: rounding a value costs up to 2^-4 = 6.25%
of it, about 2-3% RMS; e5m2 (tensorwise's output gradients) keeps 2 bits: up to 12.5%, about 5% RMS.
In a matmul's sum the rounding errors of K products add up like the products themselves (random signs),
so the relative (norm) error of a GEMM's output is about the per-element RMS error of its two operands,
not less; one Llama block chains several GEMMs (q/k -> softmax -> v -> o, gate/up -> down). Measured with
torchao's emulation (fp32 GEMMs of the FP8 values) on one block, d=512, 2 x 256 tokens, against fp32:
the block's own output (output minus the residual input) 6.5% off, its input gradient (minus the
residual's) 9.2% (tensorwise) / 6.6% (rowwise), weight gradients 7-10% / 5-7.5%. Bounds: 10% for the
block's output, 15% for gradients; and at least 0.5%, which shows FP8 really ran (bf16 against itself is 0).
"""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
from torch import nn

from sft.config import ConfigError, TrainConfig, parse_args
from sft.model import fp8
from sft.model.mpt import MPTConfig, MPTForCausalLM
from sft.training import engine
from tests.test_engine import _packed_batch, _recipe

pytest.importorskip("torchao.float8")
from torchao.float8.float8_linear import Float8Linear  # noqa: E402

OUT_TOL, GRAD_TOL, MIN_ERR = 0.10, 0.15, 0.005


def _llama(intermediate: int = 128, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(cfg)


def _mpt(**kw):
    torch.manual_seed(0)
    model = MPTForCausalLM(MPTConfig(**{"d_model": 64, "n_heads": 4, "n_layers": 2, "vocab_size": 97, **kw}))
    model.init_weights()
    return model


def _fp8_cfg(recipe="tensorwise", **kw) -> TrainConfig:
    return TrainConfig(fp8=recipe, **kw)


def _gpu(monkeypatch, capability=(9, 0), name="NVIDIA H200"):
    """Pretend to be on a CUDA device of ``capability`` (check_fp8 asks for nothing else)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    return torch.device("cuda")


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fp8_refused_on_cpu_in_one_line_before_the_run_folder(tmp_path, capsys, recipe):
    from sft.training.trainer import main

    DEFAULTS, SMOKE = _recipe("train_llama_guanaco")
    rc = main(
        DEFAULTS, ["--smoke", f"--out_dir={tmp_path}", "--progress=false", f"--fp8={recipe}"], smoke=SMOKE
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: --fp8={recipe} needs a CUDA GPU with FP8 tensor cores")
    assert "this run is on cpu" in err[0]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("recipe,hidden", [("tensorwise", False), ("none", True)])
def test_trainer_hides_torchao_only_without_fp8(monkeypatch, tmp_path, recipe, hidden):
    """The trainer hides torchao from transformers (sft.model.models.without_torchao) unless a run needs it:
    with --fp8 the check (and the conversion) run with torchao importable."""
    from sft.training import trainer

    seen = {}

    def probe(model, recipe, device, adapters=False):
        seen["hidden"] = sys.modules.get("torchao", "absent") is None
        raise ConfigError("probe")

    import transformers.models.llama.modeling_llama  # noqa: F401  (loaded before torchao is taken away)

    monkeypatch.delitem(sys.modules, "torchao")  # as in a fresh process (restored after the test)
    monkeypatch.setattr(trainer, "check_fp8", probe)
    DEFAULTS, SMOKE = _recipe("train_llama_guanaco")
    argv = ["--smoke", f"--out_dir={tmp_path}", "--progress=false", f"--fp8={recipe}"]
    assert trainer.main(DEFAULTS, argv, smoke=SMOKE) == 2
    assert seen == {"hidden": hidden}


def test_fp8_option_values():
    assert TrainConfig().fp8 == "none"
    assert parse_args(["--fp8=rowwise"]).fp8 == "rowwise"
    with pytest.raises(ConfigError, match="--fp8"):
        parse_args(["--fp8=e4m3"])


def _check(model, cfg, device):
    fp8.check_fp8(model, cfg.fp8, device, adapters=cfg.lora or cfg.qlora)


def test_fp8_none_checks_nothing():
    fp8.check_fp8(_llama(intermediate=100), "none", torch.device("cpu"), adapters=True)  # no error


@pytest.mark.parametrize("kw", [{"lora": True}, {"lora": True, "qlora": True}])
def test_fp8_refuses_lora(monkeypatch, kw):
    with pytest.raises(
        ConfigError, match=r"^--fp8=tensorwise converts the full-weight linears: not with --lora"
    ):
        _check(_llama(), _fp8_cfg(**kw), _gpu(monkeypatch))


def test_fp8_refuses_cpu():
    with pytest.raises(ConfigError, match=r"^--fp8=rowwise needs a CUDA GPU .* this run is on cpu"):
        _check(_llama(), _fp8_cfg("rowwise"), torch.device("cpu"))


def test_fp8_refuses_gpu_without_fp8_tensor_cores(monkeypatch):
    device = _gpu(monkeypatch, capability=(8, 0), name="NVIDIA A100-SXM4-80GB")
    with pytest.raises(ConfigError) as e:
        _check(_llama(), _fp8_cfg(), device)
    msg = str(e.value)
    assert msg.startswith("--fp8=tensorwise: NVIDIA A100-SXM4-80GB has compute capability 8.0, FP8 tensor")
    assert ">= 8.9" in msg and "\n" not in msg
    for ok in [(8, 9), (9, 0), (10, 0)]:  # Ada, Hopper, Blackwell pass
        _check(_llama(), _fp8_cfg(), _gpu(monkeypatch, capability=ok))


def test_fp8_refuses_without_torchao(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)  # `import torchao...` raises ImportError
    monkeypatch.setitem(sys.modules, "torchao.float8", None)
    with pytest.raises(
        ConfigError, match=r"^--fp8=tensorwise needs the torchao package: pip install torchao==0.18.0"
    ):
        _check(_llama(), _fp8_cfg(), _gpu(monkeypatch))


@pytest.mark.parametrize(
    "model,name,shape",
    [
        (
            lambda: _llama(intermediate=100),
            "model.layers.0.mlp.gate_proj",
            "in_features=64, out_features=100",
        ),
        (
            lambda: _mpt(ffn_hidden_size=200),
            "transformer.blocks.0.ffn.up_proj",
            "in_features=64, out_features=200",
        ),
        (
            lambda: _mpt(d_model=72, n_heads=4),
            "transformer.blocks.0.attn.Wqkv",
            "in_features=72, out_features=216",
        ),
    ],
)
def test_fp8_refuses_shapes_not_multiples_of_16(monkeypatch, model, name, shape):
    with pytest.raises(ConfigError) as e:
        _check(model(), _fp8_cfg(), _gpu(monkeypatch))
    assert str(e.value) == (
        f"--fp8=tensorwise: {name} has {shape}; FP8 GEMMs need both multiples of 16 (use --fp8=none for this model)"
    )


# ----------------------------------------------------------------------------- the layers converted


@pytest.mark.parametrize(
    "make,per_block,names",
    [
        (_llama, 7, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")),
        (_mpt, 4, ("attn.Wqkv", "attn.out_proj", "ffn.up_proj", "ffn.down_proj")),
    ],
)  # fmt: skip
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_convert_blocks_swaps_exactly_the_block_linears(make, per_block, names, recipe):
    """The embedding and the LM head stay as they were; every block linear becomes a Float8Linear holding
    the very same weight tensor (state dict unchanged)."""
    model = make()
    before = {k: v.data_ptr() for k, v in model.state_dict().items()}
    head = getattr(model, "lm_head", None)
    n = fp8.convert_blocks(model, recipe)
    converted = sorted(n for n, m in model.named_modules() if isinstance(m, Float8Linear))
    prefix = "model.layers" if per_block == 7 else "transformer.blocks"
    assert n == len(converted) == 2 * per_block
    assert converted == sorted(f"{prefix}.{i}.{x}" for i in range(2) for x in names)
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == before
    if head is not None:  # Llama's untied head: still a plain nn.Linear
        assert type(model.lm_head) is nn.Linear and model.lm_head is head
    assert not any(isinstance(m, Float8Linear) for m in model.modules() if isinstance(m, nn.Embedding))
    assert {
        m.config.cast_config_input.scaling_granularity.value
        for m in model.modules()
        if isinstance(m, Float8Linear)
    } == {"tensorwise" if recipe == "tensorwise" else "axiswise"}
    assert not any(
        m.config.enable_fsdp_float8_all_gather for m in model.modules() if isinstance(m, Float8Linear)
    )


def test_convert_blocks_none_converts_nothing():
    model = _llama()
    assert fp8.convert_blocks(model, "none") == 0
    assert not any(isinstance(m, Float8Linear) for m in model.modules())


def test_setup_model_converts_and_records_the_recipe():
    """setup_model converts before it compiles and returns the recipe for config.json's "resolved"."""
    model = _llama()
    cpu = torch.device("cpu")
    resolved = engine.setup_model(model, engine.resolve(model, _fp8_cfg("rowwise"), cpu), cpu)
    assert resolved["fp8"] == "rowwise" and resolved["fp8_linears"] == 14
    assert sum(isinstance(m, Float8Linear) for m in model.modules()) == 14
    plain = engine.setup_model(_llama(), engine.resolve(model, TrainConfig(), cpu), cpu)
    assert plain["fp8"] == "none" and plain["fp8_linears"] == 0
    json.dumps(resolved)  # config.json-serialisable


# ----------------------------------------------------------------------------- numerics


def block_errors(recipe: str, device, dtype, d: int, emulate: bool) -> dict[str, float]:
    """Relative errors (norm of the difference / norm of the reference) of one Llama decoder block with its
    linears in FP8 against the same block in ``dtype``: its own output (output minus the residual input),
    its input gradient minus the residual's, and each weight's gradient."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=d, intermediate_size=3 * d, num_attention_heads=d // 64, num_key_value_heads=d // 64,
        num_hidden_layers=1, attn_implementation="sdpa",
    )  # fmt: skip
    block = LlamaDecoderLayer(cfg, 0)
    for p in block.parameters():
        if p.dim() == 2:
            nn.init.normal_(p, std=0.02)
    block.to(device, dtype)
    x = torch.randn(2, 256, d, device=device, dtype=dtype)
    g = torch.randn(2, 256, d, device=device, dtype=dtype)
    pe = LlamaRotaryEmbedding(cfg).to(device)(x, torch.arange(256, device=device)[None].expand(2, -1))
    out = {}
    for use_fp8 in (False, True):
        b = copy.deepcopy(block)
        if use_fp8:
            from torchao.float8 import convert_to_float8_training

            convert_to_float8_training(b, config=fp8.float8_config(recipe, emulate=emulate))
            assert sum(isinstance(m, Float8Linear) for m in b.modules()) == 7
        xi = x.clone().requires_grad_()
        y = b(xi, position_embeddings=pe, attention_mask=None)
        y = y[0] if isinstance(y, tuple) else y
        y.backward(g)
        grads = {n: p.grad.float() for n, p in b.named_parameters() if p.dim() == 2}
        out[use_fp8] = ((y - x).detach().float(), (xi.grad - g).float(), grads)

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    (y0, gx0, gw0), (y1, gx1, gw1) = out[False], out[True]
    return {"out": rel(y1, y0), "grad_input": rel(gx1, gx0), **{n: rel(gw1[n], gw0[n]) for n in gw0}}


def _assert_within(errors: dict[str, float]) -> None:
    assert MIN_ERR < errors["out"] < OUT_TOL, errors
    for k, v in errors.items():
        if k != "out":
            assert MIN_ERR < v < GRAD_TOL, (k, errors)


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_emulated_fp8_block_within_tolerance_of_fp32(recipe):
    """On the CPU, torchao's emulation (the FP8 values, fp32 GEMMs) against fp32: the rounding alone."""
    _assert_within(block_errors(recipe, torch.device("cpu"), torch.float32, 256, emulate=True))


def test_emulated_fp8_steps_lower_the_loss_close_to_fp32():
    """Our MPT, 6 engine steps on one packed batch: the emulated-FP8 losses fall and stay within 2% of the
    fp32 run's from the same initialisation (the first, before any update, within 0.5%)."""
    batch = _packed_batch(97)
    losses = {}
    for recipe in ("none", "tensorwise"):
        model = _mpt(max_seq_len=128).train()
        fp8.convert_blocks(model, recipe, emulate=True)
        params = list(model.parameters())
        opt = torch.optim.AdamW(params, lr=1e-2)
        cpu = torch.device("cpu")
        eng = engine.Engine(model, params, opt, engine.resolve(model, TrainConfig(grad_clip=1.0), cpu), cpu)
        losses[recipe] = [eng.step([batch], lr=1e-2).loss for _ in range(6)]
    ref, low = losses["none"], losses["tensorwise"]
    assert low[-1] < low[0] - 0.5, low
    assert low[0] == pytest.approx(ref[0], rel=5e-3)
    assert low == pytest.approx(ref, rel=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_gpu_fp8_block_within_tolerance_of_bf16(recipe):
    """On an FP8 GPU: one Llama block (d=1024, 2 x 256 tokens) with real FP8 GEMMs against bf16."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("no FP8 tensor cores")
    _assert_within(block_errors(recipe, torch.device("cuda"), torch.bfloat16, 1024, emulate=False))


@pytest.mark.gpu
def test_gpu_fp8_trainer_steps_lower_the_loss(tmp_path):
    """The Llama recipe's smoke run with --fp8=tensorwise on the GPU (compiled blocks, flex attention):
    config.json records the recipe and 14 converted layers, the loss falls over 8 steps."""
    from sft.training.trainer import main

    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("no FP8 tensor cores")
    DEFAULTS, SMOKE = _recipe("train_llama_guanaco")
    args = ["--smoke", f"--out_dir={tmp_path}", "--run_name=fp8", "--fp8=tensorwise", "--max_steps=8"]
    assert main(DEFAULTS, [*args, "--progress=false"], smoke=SMOKE) == 0
    run = tmp_path / "fp8"
    resolved = json.loads((run / "config.json").read_text())["config"]["resolved"]
    assert resolved["fp8"] == "tensorwise" and resolved["fp8_linears"] == 14 and resolved["compile"] is True
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in rows if "loss" in r]
    assert len(train) == 8 and train[-1] < train[0]


def test_fp8_parity_script_reports_final_and_held_out_losses(tmp_path):
    """benchmarks/fp8_parity.py: mean of the last N training losses, the last held-out loss, the relative
    difference of the FP8 run from the bf16 one, and one plot written into both run folders."""
    import subprocess

    from tests.conftest import REPO

    for name, recipe, shift in (("bf16", "none", 0.0), ("fp8", "tensorwise", 0.03)):
        run = tmp_path / name
        run.mkdir()
        (run / "config.json").write_text(json.dumps({"config": {"fp8": recipe}}))
        rows = [{"step": s, "loss": 3.0 - 0.01 * s + shift} for s in range(1, 101)]
        rows += [{"step": 0, "eval_loss": 4.0}, {"step": 100, "eval_loss": 2.5 + shift}]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "fp8_parity.py"), str(tmp_path / "bf16"), str(tmp_path / "fp8"),
         "--last=20", f"--png={tmp_path / 'p.png'}"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    result = json.loads(out.stdout.strip().splitlines()[-1])
    train_bf16 = sum(3.0 - 0.01 * s for s in range(81, 101)) / 20  # 2.095
    assert result["runs"][0]["final_train_loss"] == pytest.approx(train_bf16)
    assert result["runs"][1]["held_out_loss"] == pytest.approx(2.53)
    assert result["rel_diff_final_train_loss"] == pytest.approx(0.03 / train_bf16)
    assert result["rel_diff_held_out_loss"] == pytest.approx(0.03 / 2.5)
    assert "held_out_loss: fp8 vs bf16: +1.20% (NOT within 1%)" in out.stdout
    for p in (tmp_path / "bf16" / "fp8_parity.png", tmp_path / "fp8" / "fp8_parity.png", tmp_path / "p.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
