"""sft/training/offload.py: optimizer state on the host, streamed through staging slots, bit-identical to
the optimizer that keeps it beside the parameters.

CPU (the same code path with plain copies): each low-precision mode over two param groups (weight decay on
one), bf16 and fp32 parameters, some without a gradient in some steps, gives the same parameters and state
bits as ``optim.build_optimizer``; resume through ``state_dict`` is bit-exact (also across the two
optimizers); the staging size is the largest parameter's state times the slots; the refusals raise. The
Triton kernels run on the staged state in the interpreter (a subprocess). CUDA (-m gpu): the same equality
with pinned host state, and the state is not on the GPU.
"""

import io
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from sft.config import ConfigError
from sft.training import fused_adamw, offload, optim
from sft.training.offload import build_offloaded, offload_gpu_bytes, offload_refusal, offload_seconds

REPO = Path(__file__).resolve().parents[1]
MODES = ("adamw_kahan", "adamw_sr", "adamw_8bit")
# the largest (64 x 48 = 3,072 elements) has no alignment padding in any mode; (3, 5) has
SHAPES = [(64, 48), (48,), (32, 64), (3, 5), (64,)]
DTYPES = [torch.bfloat16, torch.bfloat16, torch.bfloat16, torch.bfloat16, torch.float32]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: intra-op threads only contend on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _params(device: str = "cpu", scale: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = []
    for shape, dtype in zip(SHAPES, DTYPES):
        shape = (shape[0] * scale, *shape[1:])
        out.append((torch.randn(shape, generator=g) * 0.02).to(dtype).to(device).requires_grad_())
    return out


def _clone(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone().requires_grad_() for p in params]


def _groups(params: list[torch.Tensor]) -> list[dict]:
    """Matrices with weight decay; the rest without, at another learning rate."""
    return [
        {"params": [p for p in params if p.dim() == 2], "weight_decay": 0.1},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "lr": 3e-3},
    ]


def _build(params, name: str, offloaded: bool, **kw):
    build = build_offloaded if offloaded else optim.build_optimizer
    return build(_groups(params), name, lr=1e-3, betas=(0.9, 0.95), seed=7, **kw)


def _set_grads(params: list[torch.Tensor], step: int) -> None:
    """Seeded gradients; parameter k has none in the steps where (step + k) % 3 == 0."""
    g = torch.Generator().manual_seed(100 + step)
    for k, p in enumerate(params):
        grad = (torch.randn(p.shape, generator=g) * 1e-2).to(p.dtype).to(p.device)
        p.grad = None if (step + k) % 3 == 0 else grad


def _run(params, opt, steps: int, start: int = 0) -> None:
    for s in range(start, start + steps):
        _set_grads(params, s)
        opt.step()
        opt.zero_grad(set_to_none=True)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(-1).view(torch.uint8).cpu()


def _assert_same(params_a, opt_a, params_b, opt_b) -> None:
    """Parameters and every state entry equal bit for bit."""
    for a, b in zip(params_a, params_b):
        assert torch.equal(_bits(a), _bits(b))
    sa, sb = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    assert sa.keys() == sb.keys() and sa
    for i in sa:
        assert sa[i].keys() == sb[i].keys()
        for key, va in sa[i].items():
            vb = sb[i][key]
            if torch.is_tensor(va):
                assert va.dtype == vb.dtype and va.shape == vb.shape, (i, key)
                assert torch.equal(_bits(va), _bits(vb)), (i, key)
            else:
                assert va == vb, (i, key)


def _state_tensors(opt) -> list[torch.Tensor]:
    return [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]


@pytest.mark.parametrize("name", MODES)
@pytest.mark.parametrize("slots", [1, 2])
def test_offloaded_steps_are_bit_identical_to_the_optimizer_beside_the_params(name, slots):
    ref_params, off_params = _params(), _params()
    ref, off = _build(ref_params, name, False), _build(off_params, name, True, slots=slots)
    _run(ref_params, ref, 5)
    _run(off_params, off, 5)
    _assert_same(ref_params, ref, off_params, off)
    # every parameter was skipped in some step: the step counts differ, as in the reference
    assert len({st["step"] for st in off.state.values()}) > 1
    assert all(t.device.type == "cpu" for t in _state_tensors(off))
    assert off.gpu_bytes() == offload_gpu_bytes(off_params, name, slots=slots)
    assert off._staging.buffers == []  # given back after the step: the next backward reuses that memory


def test_fp32_moments_are_staged_as_fp32():
    ref_params, off_params = _params(), _params()
    kw = {"moment_dtype": torch.float32}
    ref, off = _build(ref_params, "adamw_kahan", False, **kw), _build(off_params, "adamw_kahan", True, **kw)
    _run(ref_params, ref, 3)
    _run(off_params, off, 3)
    _assert_same(ref_params, ref, off_params, off)
    assert off.state[off_params[0]]["exp_avg"].dtype == torch.float32
    assert off.gpu_bytes() == 2 * 64 * 48 * (4 + 4 + 2)


def _saved(opt) -> dict:
    """state_dict through torch.save / torch.load, as a checkpoint does."""
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("name", MODES)
@pytest.mark.parametrize("first, second", [(True, True), (False, True), (True, False)])
def test_save_load_continue_is_bit_exact(name, first, second):
    """3 steps, save, a fresh optimizer loads, 3 more == 6 uninterrupted steps of the plain optimizer;
    (first, second): whether the saving and the loading optimizer are offloaded."""
    ref_params = _params()
    ref = _build(ref_params, name, False)
    _run(ref_params, ref, 6)

    params = _params()
    opt = _build(params, name, first)
    _run(params, opt, 3)
    saved = _saved(opt)
    params = _clone(params)
    opt = _build(params, name, second)
    opt.load_state_dict(saved)
    if second:
        assert all(t.device.type == "cpu" for t in _state_tensors(opt))
    _run(params, opt, 3, start=3)
    _assert_same(ref_params, ref, params, opt)


def test_load_copies_into_the_host_tensors_it_has():
    """Loading into a stepped optimizer reuses its host tensors; the loaded dict is not aliased."""
    params = _params()
    opt = _build(params, "adamw_kahan", True)
    _run(params, opt, 2)
    saved = _saved(opt)
    before = {id(t) for t in _state_tensors(opt)}
    _run(params, opt, 1, start=2)
    opt.load_state_dict(saved)
    assert {id(t) for t in _state_tensors(opt)} == before
    for st in saved["state"].values():
        st["exp_avg"].zero_()
    assert any(t.abs().sum() > 0 for t in (st["exp_avg"] for st in opt.state.values()))
    # a parameter the saved state does not know loses its state, as in torch
    del saved["state"][0]
    opt.load_state_dict(saved)
    assert params[0] not in opt.state or not opt.state[params[0]]


def test_a_loaded_state_of_other_dtypes_resizes_the_slots():
    """fp32 moments saved, loaded into a stepped bf16-moment optimizer: kept as saved (as optim does) and
    staged whole; the same sequence with the plain optimizer gives the same bits."""

    def run(offloaded):
        params = _params()
        opt = _build(params, "adamw_sr", offloaded, moment_dtype=torch.float32)
        _run(params, opt, 1)
        saved = _saved(opt)
        params = _clone(params)
        opt = _build(params, "adamw_sr", offloaded)
        _run(params, opt, 1, start=1)  # slots sized for bf16 moments
        opt.load_state_dict(saved)
        _run(params, opt, 2, start=1)
        return params, opt

    (ref_params, ref), (params, opt) = run(False), run(True)
    _assert_same(ref_params, ref, params, opt)
    # params[0] had no gradient in step 0 (nothing saved): bf16 moments; params[2] keeps its fp32 ones
    assert opt.state[params[0]]["exp_avg"].dtype == torch.bfloat16
    assert opt.state[params[2]]["exp_avg"].dtype == torch.float32
    assert opt.gpu_bytes() == 2 * 32 * 64 * 8 > offload_gpu_bytes(params, "adamw_sr")


def test_clipping_and_accumulation_before_step():
    """The trainer's order: accumulate micro-batches, clip the global norm, step: same bits."""
    x = torch.randn(16, 48, generator=torch.Generator().manual_seed(3))

    def train(params, opt):
        for _ in range(3):
            for half in (x[:8], x[8:]):  # params[3] gets no gradient
                w1, shift, w2, _, bias = (p.float() for p in params)
                h = torch.tanh((half + shift) @ w1.T + bias)  # (8, 64)
                (h @ w2.T).square().mean().backward()
            torch.nn.utils.clip_grad_norm_(params, 1e-3)
            opt.step()
            opt.zero_grad(set_to_none=True)

    for name in MODES:
        ref_params, off_params = _params(), _params()
        ref, off = _build(ref_params, name, False), _build(off_params, name, True)
        train(ref_params, ref)
        train(off_params, off)
        _assert_same(ref_params, ref, off_params, off)


@pytest.mark.parametrize("name", MODES)
def test_staging_bytes_are_the_largest_state_times_the_slots(name):
    params = _params()
    ref = _build(params, name, False)
    _run(params, ref, 3)
    largest = max(
        sum(t.numel() * t.element_size() for t in st.values() if torch.is_tensor(t))
        for st in ref.state.values()
    )
    per_param = {"adamw_kahan": 6, "adamw_sr": 4, "adamw_8bit": 2 + 8 / 256}[name]
    assert largest == 64 * 48 * per_param
    for slots in (1, 2, 3):
        assert offload_gpu_bytes(params, name, slots=slots) == slots * largest
    # the specs are the optimizer's own state layout, parameter by parameter
    specs = offload.state_specs(params, name)
    for p, spec in zip(params, specs):
        assert spec == [(t.shape, t.dtype) for t in ref.state[p].values() if torch.is_tensor(t)]
    # meta parameters (the memory plan's model before loading) give the same
    metas = [torch.empty(p.shape, dtype=p.dtype, device="meta") for p in params]
    assert offload_gpu_bytes(metas, name) == 2 * largest


def test_each_staged_tensor_starts_on_a_16_byte_boundary():
    """(3, 5) bf16: 30 bytes per tensor, staged at 32-byte steps; alone it sizes the slot."""
    p = torch.zeros(3, 5, dtype=torch.bfloat16)
    assert offload_gpu_bytes([p], "adamw_kahan", slots=1) == 3 * 32
    assert offload_gpu_bytes([p], "adamw_8bit", slots=1) == 2 * 256 + 2 * 16
    staging = offload._Staging(torch.device("cpu"), 96, 1)
    staging.allocate()
    views = staging.views(0, {k: torch.zeros(3, 5, dtype=torch.bfloat16) for k in "abc"})
    base = staging.buffers[0].data_ptr()
    assert [v.data_ptr() - base for v in views.values()] == [0, 32, 64]


def test_refusals():
    params = _params()
    for name in ("adamw", "adamw_bf16", "lion"):
        assert offload_refusal(name) is not None
        with pytest.raises(ConfigError, match="offloaded optimizer state does not support"):
            build_offloaded(params, name)
        with pytest.raises(ConfigError, match="offloaded optimizer state does not support"):
            offload_gpu_bytes(params, name)
    assert offload_refusal("adamw_sr") is None
    assert "backward" in offload_refusal("adamw_sr", in_backward=True)
    assert "FSDP2" in offload_refusal("adamw_8bit", world=2)
    opt = build_offloaded(params, "adamw_sr")
    with pytest.raises(ConfigError, match="inside backward"):
        opt.step_parameter(params[0])
    optim.step_in_backward(opt, params[:1])
    with pytest.raises(ConfigError, match="inside backward"):
        params[0].float().sum().backward()
    with pytest.raises(ConfigError, match="one device"):
        build_offloaded(
            [torch.zeros(4, requires_grad=True), torch.zeros(4, device="meta", requires_grad=True)]
        )

    class DTensor(torch.Tensor):  # what optim._is_dtensor recognises
        def to_local(self):
            return self

    with pytest.raises(ConfigError, match="FSDP2"):
        build_offloaded([torch.zeros(4).as_subclass(DTensor).requires_grad_()], "adamw_kahan")


def test_offload_seconds_is_the_state_over_the_measured_link():
    n = 14_800_000_000  # Qwen3-14B
    gib = n * 6 / 2**30  # kahan: 82.7 GiB each way
    assert offload_seconds(n, "adamw_kahan") == pytest.approx(gib / 49.9 + gib / 42.8)
    assert offload_seconds(n, "adamw_kahan") == pytest.approx(3.59, abs=0.01)
    assert offload_seconds(n, "adamw_kahan", duplex=True) == pytest.approx(gib / 42.8)
    assert (
        offload_seconds(n, "adamw_8bit") < offload_seconds(n, "adamw_sr") < offload_seconds(n, "adamw_kahan")
    )
    assert offload_seconds(n, "adamw_sr", h2d_gib_s=25, d2h_gib_s=25) == pytest.approx(2 * n * 4 / 2**30 / 25)


def test_build_for_groups_as_the_plain_builder():
    root = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.LayerNorm(4)).to(torch.bfloat16)
    cfg = types.SimpleNamespace(
        optimizer="adamw_8bit", lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1
    )
    params, opt = offload.build_for(root, cfg)
    _, plain = optim.build_for(root, cfg)
    assert isinstance(opt, offload.OffloadedAdamW8bit) and len(params) == 4
    assert [g["weight_decay"] for g in opt.param_groups] == [g["weight_decay"] for g in plain.param_groups]


@pytest.mark.skipif(not fused_adamw.triton_available(), reason="triton is not importable")
def test_triton_kernels_on_staged_state_in_the_interpreter():
    """TRITON_INTERPRET=1 (a subprocess): the Triton kernels take the staged views (contiguous, aligned)
    and give the bits of the plain optimizer's Triton step."""
    code = """
import json, torch
from tests.test_offload import MODES, _build, _params, _run, _assert_same
out = {}
for name in MODES:
    ref_params, off_params = _params(), _params()
    ref = _build(ref_params, name, False, kernel="triton")
    off = _build(off_params, name, True, kernel="triton")
    _run(ref_params, ref, 2)
    _run(off_params, off, 2)
    _assert_same(ref_params, ref, off_params, off)
    out[name] = off.kernel
print(json.dumps(out))
"""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == dict.fromkeys(MODES, "triton")


@pytest.mark.gpu
@pytest.mark.parametrize("name", MODES)
def test_offloaded_on_cuda_is_bit_identical_with_pinned_host_state(name):
    """Triton kernels on CUDA, state page-locked on the host; the GPU holds params, grads and the slots."""
    scale = 256  # (16,384 x 48) and (8,192 x 64): state of MBs, far above any allocator slack
    ref_params, off_params = _params("cuda", scale), _params("cuda", scale)
    ref = _build(ref_params, name, False)
    _run(ref_params, ref, 4)

    off = _build(off_params, name, True)
    base = torch.cuda.memory_allocated()  # everything so far, the parameters included
    staging = offload_gpu_bytes(off_params, name)
    for s in range(4):
        _set_grads(off_params, s)
        off.step()
        grads = sum(p.grad.numel() * p.grad.element_size() for p in off_params if p.grad is not None)
        assert torch.cuda.memory_allocated() <= base + grads + staging + 2**16
    assert off.gpu_bytes() == staging
    off.zero_grad(set_to_none=True)
    _assert_same(ref_params, ref, off_params, off)
    state = _state_tensors(off)
    assert sum(t.numel() * t.element_size() for t in state) > 2**20  # on the GPU it would break the bound
    assert all(t.device.type == "cpu" and t.is_pinned() for t in state)
    assert off.kernel == "triton"

    before = torch.cuda.memory_allocated()
    off.load_state_dict(_saved(off))
    assert torch.cuda.memory_allocated() == before
    assert all(t.device.type == "cpu" and t.is_pinned() for t in _state_tensors(off))


@pytest.mark.gpu
def test_offloaded_on_cuda_resumes_bit_exactly():
    ref_params = _params("cuda")
    ref = _build(ref_params, "adamw_kahan", False)
    _run(ref_params, ref, 6)
    params = _params("cuda")
    opt = _build(params, "adamw_kahan", True)
    _run(params, opt, 3)
    saved = _saved(opt)
    params = _clone(params)
    opt = _build(params, "adamw_kahan", True)
    opt.load_state_dict(saved)
    _run(params, opt, 3, start=3)
    _assert_same(ref_params, ref, params, opt)


# ----------------------------------------------------------------------------- through the trainer


def _trainer_args(out, *extra):
    return [
        "--model=tiny-llama", "--data=bundled", "--limit=12", "--max_len=256", "--overlong=drop",
        "--eval_size=2", "--max_steps=6", "--micro_batch=1", "--grad_accum=2", "--lr=1e-3", "--warmup_steps=2",
        "--num_samples=0", "--no-save_final", "--no-progress", "--device=cpu", "--precision=bf16",
        "--optimizer=adamw_kahan", "--save_every=3", f"--out_dir={out}", *extra,
    ]  # fmt: skip


def test_the_trainer_with_the_state_on_the_host_gives_the_same_losses_and_resumes(tmp_path, monkeypatch):
    """--offload_optimizer=true through the trainer (CPU, bf16 tiny Llama, adamw_kahan): config.json records
    the plan's choice, the per-step losses equal the GPU-resident run's bit for bit, and a run stopped after
    its step-3 checkpoint resumes to the same losses."""
    import json

    from sft.config import parse_args
    from sft.training.trainer import train
    from tests.block_fixtures import run_losses

    monkeypatch.setenv("SFT_CACHE", str(tmp_path / "cache"))

    plain = train(parse_args(_trainer_args(tmp_path, "--run_name=plain", "--offload_optimizer=false")))
    host = train(parse_args(_trainer_args(tmp_path, "--run_name=host", "--offload_optimizer=true")))
    resolved = json.loads((host / "config.json").read_text())["config"]["resolved"]
    assert resolved["optimizer_offload"] is True
    assert json.loads((plain / "config.json").read_text())["config"]["resolved"]["optimizer_offload"] is False
    assert len(run_losses(host)) == 6 and run_losses(host) == run_losses(plain)
    args = _trainer_args(tmp_path, "--run_name=cut", "--offload_optimizer=true", "--stop_after=3")
    cut = train(parse_args(args))
    assert len(run_losses(cut)) == 3
    train(parse_args([f"--out_dir={tmp_path}", f"--resume={cut}", "--no-progress"]))
    assert run_losses(cut) == run_losses(host)


def test_offload_refused_in_one_line_before_the_run_folder(tmp_path):
    """--offload_optimizer=true with plain AdamW on fp32 weights: one ConfigError line, no run folder."""
    from sft.config import ConfigError, parse_args
    from sft.training.trainer import train

    args = _trainer_args(tmp_path, "--run_name=bad", "--offload_optimizer=true")
    args = [a for a in args if not a.startswith(("--precision", "--optimizer"))] + ["--precision=fp32"]
    with pytest.raises(
        ConfigError, match=r"^--offload_optimizer=true is not possible with --optimizer=adamw"
    ):
        train(parse_args([*args, "--optimizer=adamw"]))
    assert not (tmp_path / "bad").exists()


def test_a_refused_page_lock_falls_back_to_pageable_memory(monkeypatch, caplog):
    """Where cudaHostRegister fails (a sandbox that refuses page-locking), the state is kept in plain host
    memory with one warning naming the CUDA error, instead of failing the run at its first step."""
    import logging

    from sft.training import offload

    calls = []

    class Refusing:
        def cudaHostRegister(self, ptr, nbytes, flags):  # noqa: N802  (the CUDA runtime's name)
            calls.append(nbytes)
            return 1  # cudaErrorInvalidValue

    monkeypatch.setattr(torch.cuda, "cudart", lambda: Refusing())
    host = offload._HostMemory(pin=True)
    with caplog.at_level(logging.WARNING, logger="sft"):
        a = host.zeros((4, 8), torch.bfloat16)
        b = host.zeros((16,), torch.float32)
    assert calls == [64] and not host.pin and host.pinned == {}  # tried once, then pageable
    assert a.shape == (4, 8) and b.device.type == "cpu" and not a.any()
    assert "page-locking 64 bytes of host memory failed (CUDA error 1)" in caplog.text
