"""Triton kernels for the low-precision AdamW modes of `sft/training/optim.py`: one launch per tensor.

Each kernel reads every byte of a parameter's weight, gradient and optimizer state once and writes
the weight and state once: the step is as fast as the memory allows. Arithmetic is fp32, the same
operations in the same order as the torch reference in `optim.py` (`_adamw_update`,
`_adamw8bit_update`), so a kernel and its reference differ only by

- the random bits of stochastic rounding (here `tl.randint4x(seed, offset)`, Philox; the reference
  draws from a `torch.Generator` seeded with the same per-step seed: same distribution, other bits),
- fp32 rounding of a few operations (FMA contraction and the GPU's division / square root): a
  stored bf16 or e4m3 value may land on the neighbouring grid point, i.e. one ulp of its format.

Kernels:

| function | mode(s) | bytes moved per bf16 parameter (read + write) |
| --- | --- | --- |
| `adamw_lowp_step` | `adamw_kahan` (bf16 compensation), `adamw_sr` (stochastic weight rounding), bf16 or fp32 moments | kahan 10 + 8, sr 8 + 6 |
| `adamw8bit_step` | `adamw_8bit`: e4m3 moments m and r = sqrt(v) with one fp32 scale per 256 elements | 6.06 + 4.06 |

Random bits: element i of a tensor uses `randint4x(seed, i)`, four 32-bit words: the first goes to
the first moment, the second to the second moment, the third to the weight. `seed` is derived per
step and per parameter by the optimizer (`optim._step_seed`), so a step is reproducible and resume
is bit-exact on the same device. Integer arguments that change every launch (`seed`) are not
specialised; lr, bias corrections and betas are fp32 scalars: changing them never recompiles.

`TRITON_INTERPRET=1` (set before this module is imported) runs the kernels on CPU tensors:
`sft.training.optim.check_kernels("cpu")` then compares them with the torch reference (tests/test_optim.py does so in
a subprocess; `benchmarks/optim_step.py --check` on CUDA).
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is optional: the torch reference runs instead
    triton = None
    tl = None

QBLOCK = 256  # elements per fp32 scale of the 8-bit moments
FP8_MAX = 448.0  # largest finite float8_e4m3fn
BLOCK = 1024  # elements per program of the bf16 kernel
QROWS = 4  # quantisation blocks per program of the 8-bit kernel (1,024 elements)


def triton_available() -> bool:
    """True when triton imports (the kernels may still need CUDA tensors, or TRITON_INTERPRET=1 on CPU)."""
    return triton is not None


def can_run(*tensors: torch.Tensor | None) -> bool:
    """Whether the kernels can take these tensors: triton present, contiguous, on CUDA (or interpreted)."""
    if triton is None:
        return False
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    for t in tensors:
        if t is None:
            continue
        if not t.is_contiguous() or not (t.is_cuda or (interpret and t.device.type == "cpu")):
            return False
    return True


if triton is not None:

    @triton.jit
    def _sr_bf16(x, rnd):
        """fp32 -> bf16 with stochastic rounding: add 16 random bits below bf16's mantissa, truncate."""
        bits = x.to(tl.int32, bitcast=True)
        noise = rnd.to(tl.int32, bitcast=True) & 0xFFFF
        return ((bits + noise) & -65536).to(tl.float32, bitcast=True).to(tl.bfloat16)

    @triton.jit
    def _rne_bf16(x):
        """fp32 -> bf16 rounding to nearest even, in integer arithmetic.

        What `.to(tl.bfloat16)` does on the GPU; written out because the interpreter
        (TRITON_INTERPRET=1) truncates instead, and the Kahan compensation measures the rounding.
        """
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & -65536
        return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)

    @triton.jit
    def _sr_e4m3(q, rnd):
        """fp32 in [-448, 448] -> e4m3 with stochastic rounding (see optim._round_stochastic_e4m3)."""
        noise = rnd.to(tl.int32, bitcast=True) & 0xFFFFF
        bits = q.to(tl.int32, bitcast=True)
        t = ((bits + noise) & -1048576).to(tl.float32, bitcast=True)
        t = tl.minimum(tl.maximum(t, -448.0), 448.0)
        # e4m3 subnormals (|q| < 2^-6) sit on a fixed grid of 2^-9: round on that grid instead.
        u = noise.to(tl.float32) * 9.5367431640625e-07  # 2^-20: uniform in [0, 1)
        sub = tl.floor(q * 512.0 + u) * 0.001953125  # / 512
        return tl.where(tl.abs(q) < 0.015625, sub, t).to(tl.float8e4nv)

    @triton.jit(do_not_specialize=["seed"])
    def _adamw_lowp_kernel(
        p_ptr,
        g_ptr,
        m_ptr,
        v_ptr,
        c_ptr,
        n,
        lr,
        bc1,
        bc2_sqrt,
        beta1,
        omb1,
        beta2,
        omb2,
        eps,
        wd,
        seed,
        PARAM_MODE: tl.constexpr,  # 0: round to nearest (or fp32), 1: Kahan, 2: stochastic (bf16)
        PARAM_BF16: tl.constexpr,
        SR_MOMENTS: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
    ):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = offs < n
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m32 = m * beta1 + g * omb1
        v32 = v * beta2 + g * g * omb2
        r0, r1, r2, r3 = tl.randint4x(seed, offs)
        if SR_MOMENTS:
            tl.store(m_ptr + offs, _sr_bf16(m32, r0), mask=mask)
            tl.store(v_ptr + offs, _sr_bf16(v32, r1), mask=mask)
        else:
            tl.store(m_ptr + offs, m32.to(m_ptr.dtype.element_ty), mask=mask)
            tl.store(v_ptr + offs, v32.to(v_ptr.dtype.element_ty), mask=mask)
        denom = tl.div_rn(tl.sqrt_rn(v32), bc2_sqrt) + eps
        update = -(lr * wd) * p - tl.div_rn((lr / bc1) * m32, denom)
        if PARAM_MODE == 1:
            c = tl.load(c_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            y = update + c
            if PARAM_BF16:
                new_p = _rne_bf16(p + y)
                new_c = _rne_bf16(y - (new_p.to(tl.float32) - p))
            else:
                new_p = (p + y).to(p_ptr.dtype.element_ty)
                new_c = (y - (new_p.to(tl.float32) - p)).to(c_ptr.dtype.element_ty)
            tl.store(c_ptr + offs, new_c, mask=mask)
            tl.store(p_ptr + offs, new_p, mask=mask)
        elif PARAM_MODE == 2:
            tl.store(p_ptr + offs, _sr_bf16(p + update, r2), mask=mask)
        elif PARAM_BF16:
            tl.store(p_ptr + offs, _rne_bf16(p + update), mask=mask)
        else:
            tl.store(p_ptr + offs, (p + update).to(p_ptr.dtype.element_ty), mask=mask)

    @triton.jit(do_not_specialize=["seed"])
    def _adamw8bit_kernel(
        p_ptr,
        g_ptr,
        mq_ptr,
        ms_ptr,
        rq_ptr,
        rs_ptr,
        n,
        nblocks,
        lr,
        bc1,
        bc2_sqrt,
        beta1,
        omb1,
        beta2,
        omb2,
        eps,
        wd,
        bound,
        seed,
        SR_PARAM: tl.constexpr,
        ROWS: tl.constexpr,
        QB: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = pid * ROWS + tl.arange(0, ROWS)  # quantisation blocks of this program
        rmask = rows < nblocks
        offs = rows.to(tl.int64)[:, None] * QB + tl.arange(0, QB)[None, :]
        qmask = rmask[:, None] & (offs >= 0)
        emask = offs < n
        g = tl.load(g_ptr + offs, mask=emask, other=0.0).to(tl.float32)
        p = tl.load(p_ptr + offs, mask=emask, other=0.0).to(tl.float32)
        ms = tl.load(ms_ptr + rows, mask=rmask, other=0.0)
        rs = tl.load(rs_ptr + rows, mask=rmask, other=0.0)
        m = tl.load(mq_ptr + offs, mask=qmask, other=0.0).to(tl.float32) * ms[:, None]
        r = tl.load(rq_ptr + offs, mask=qmask, other=0.0).to(tl.float32) * rs[:, None]
        m32 = m * beta1 + g * omb1
        v32 = r * r * beta2 + g * g * omb2
        r32 = tl.sqrt_rn(v32)
        denom = tl.div_rn(r32, bc2_sqrt) + eps
        step = tl.div_rn((lr / bc1) * m32, denom)
        lim = lr * bound
        step = tl.minimum(tl.maximum(step, -lim), lim)
        update = -(lr * wd) * p - step
        r0, r1, r2, r3 = tl.randint4x(seed, offs)
        m_amax = tl.max(tl.abs(m32), axis=1)
        r_amax = tl.max(r32, axis=1)
        m_q = _sr_e4m3(tl.div_rn(m32, tl.where(m_amax > 0, m_amax, 1.0)[:, None]) * 448.0, r0)
        r_q = _sr_e4m3(tl.div_rn(r32, tl.where(r_amax > 0, r_amax, 1.0)[:, None]) * 448.0, r1)
        tl.store(mq_ptr + offs, m_q, mask=qmask)
        tl.store(rq_ptr + offs, r_q, mask=qmask)
        tl.store(ms_ptr + rows, m_amax / 448.0, mask=rmask)
        tl.store(rs_ptr + rows, r_amax / 448.0, mask=rmask)
        if SR_PARAM:
            tl.store(p_ptr + offs, _sr_bf16(p + update, r2), mask=emask)
        else:
            tl.store(p_ptr + offs, (p + update).to(p_ptr.dtype.element_ty), mask=emask)


def adamw_lowp_step(
    p: torch.Tensor,
    g: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    c: torch.Tensor | None,
    *,
    lr: float,
    bc1: float,
    bc2_sqrt: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    stochastic_param: bool,
    seed: int,
) -> None:
    """One AdamW step of `optim._adamw_update` on contiguous tensors, in place, one kernel launch.

    `c` is the Kahan compensation (or None); `stochastic_param` rounds a bf16 weight stochastically
    (ignored with `c`); moments are stored with stochastic rounding when they are bf16.
    """
    n = p.numel()
    if n == 0:
        return
    if c is not None:
        mode = 1
    elif stochastic_param and p.dtype == torch.bfloat16:
        mode = 2
    else:
        mode = 0
    grid = (triton.cdiv(n, BLOCK),)
    _adamw_lowp_kernel[grid](
        p,
        g,
        m,
        v,
        p if c is None else c,
        n,
        float(lr),
        float(bc1),
        float(bc2_sqrt),
        float(beta1),
        float(1 - beta1),
        float(beta2),
        float(1 - beta2),
        float(eps),
        float(weight_decay),
        int(seed),
        PARAM_MODE=mode,
        PARAM_BF16=p.dtype == torch.bfloat16,
        SR_MOMENTS=m.dtype == torch.bfloat16,
        BLOCK_SIZE=BLOCK,
        num_warps=4,
    )


def adamw8bit_step(
    p: torch.Tensor,
    g: torch.Tensor,
    m_q: torch.Tensor,
    m_scale: torch.Tensor,
    r_q: torch.Tensor,
    r_scale: torch.Tensor,
    *,
    lr: float,
    bc1: float,
    bc2_sqrt: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    bound: float,
    seed: int,
) -> None:
    """One step of `optim._adamw8bit_update` on contiguous tensors, in place, one kernel launch.

    `m_q`, `r_q`: float8_e4m3fn of `m_scale.numel() * 256` elements (the last block padded with
    zeros); `m_scale`, `r_scale`: fp32 per block (absmax / 448). `bound` caps |lr * m_hat / denom| at
    `lr * bound` (see `optim._ratio_bound`).
    """
    n = p.numel()
    nblocks = m_scale.numel()
    if n == 0:
        return
    grid = (triton.cdiv(nblocks, QROWS),)
    _adamw8bit_kernel[grid](
        p,
        g,
        m_q,
        m_scale,
        r_q,
        r_scale,
        n,
        nblocks,
        float(lr),
        float(bc1),
        float(bc2_sqrt),
        float(beta1),
        float(1 - beta1),
        float(beta2),
        float(1 - beta2),
        float(eps),
        float(weight_decay),
        float(bound),
        int(seed),
        SR_PARAM=p.dtype == torch.bfloat16,
        ROWS=QROWS,
        QB=QBLOCK,
        num_warps=4,
    )
