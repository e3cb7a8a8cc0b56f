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
`check_kernels("cpu")` then compares them with the torch reference (tests/test_optim.py does so in
a subprocess; `benchmarks/optim_step.py --check` on CUDA).
"""

from __future__ import annotations

import os
from typing import Any

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


def _ulps(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> float:
    """Largest distance between a and b in units of the grid spacing of `dtype` at max(|a|, |b|).

    The spacing is that of a normal number of `dtype` at the value (bf16: 2^-7 relative,
    e4m3: 2^-3 relative), floored at the smallest subnormal spacing (e4m3: 2^-9).
    """
    a, b = a.double(), b.double()
    mag = torch.maximum(a.abs(), b.abs())
    mant = {torch.bfloat16: 7, torch.float8_e4m3fn: 3}[dtype]
    tiny = {torch.bfloat16: 2.0**-133, torch.float8_e4m3fn: 2.0**-9}[dtype]
    exp = torch.floor(torch.log2(mag.clamp_min(tiny)))
    spacing = torch.maximum(torch.exp2(exp - mant), torch.tensor(tiny, dtype=torch.float64))
    return ((a - b).abs() / spacing).max().item() if a.numel() else 0.0


def check_kernels(device: str = "cuda", numels: tuple[int, ...] = (1, 300, 4096, 70_001)) -> dict[str, Any]:
    """Run each kernel and its torch reference on the same inputs once; return the disagreement.

    One step from the same random state (weights ~ N(0, 0.02), moments of a few steps' size) for
    tensors of `numels` elements, per mode: the largest difference of every stored tensor, in ulps of
    its storage format (stochastic rounding may pick either neighbour: <= 1 expected, 2 allowed for
    fp32 rounding on top), and for the deterministic parts (Kahan weight + compensation, scales) the
    largest absolute difference. Also the mean of the weight change of both, over all elements
    (stochastic rounding is unbiased: the means agree to noise).
    """
    from sft.training import optim

    gen = torch.Generator().manual_seed(0)
    out: dict[str, Any] = {}
    hyper = dict(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
    step = 7
    bc1, bc2_sqrt = 1 - hyper["beta1"] ** step, (1 - hyper["beta2"] ** step) ** 0.5

    def rnd(n, scale=1.0):
        return (torch.randn(n, generator=gen) * scale).to(device)

    for mode in ("adamw_kahan", "adamw_sr", "adamw_8bit"):
        stats: dict[str, float] = {}
        for n in numels:
            p0 = rnd(n, 0.02).bfloat16()
            g = rnd(n, 1e-3).bfloat16()
            seed = 1234 + n
            if mode == "adamw_8bit":
                nb = -(-n // QBLOCK)
                m0 = torch.zeros(nb * QBLOCK, device=device)
                m0[:n] = rnd(n, 1e-3)
                r0 = torch.zeros(nb * QBLOCK, device=device)
                r0[:n] = m0[:n].abs() + rnd(n, 1e-3).abs()  # |m| <= r
                mq, ms = optim._quantize_blockwise(m0, None)
                rq, rs = optim._quantize_blockwise(r0, None)
                bound = optim._ratio_bound(hyper["beta1"], hyper["beta2"], step)
                ref = [p0.clone(), mq.clone(), ms.clone(), rq.clone(), rs.clone()]
                ker = [p0.clone(), mq.clone(), ms.clone(), rq.clone(), rs.clone()]
                scal = torch.tensor([hyper["lr"], bc1, bc2_sqrt], device=device)
                genr = torch.Generator(device=device).manual_seed(seed)
                optim._adamw8bit_update(
                    ref[0], g, *ref[1:], scal, hyper["beta1"], hyper["beta2"], hyper["eps"],
                    hyper["weight_decay"], bound, genr,
                )  # fmt: skip
                adamw8bit_step(
                    ker[0], g, *ker[1:], bc1=bc1, bc2_sqrt=bc2_sqrt, bound=bound, seed=seed, **hyper
                )
                names = ["weight", "exp_avg", "exp_avg_scale", "sqrt_exp_avg_sq", "sqrt_exp_avg_sq_scale"]
                for name, a, b in zip(names, ref, ker):
                    if a.dtype == torch.float32:  # scales: deterministic
                        key, val = f"{name}_rel", ((a - b).abs() / a.abs().clamp_min(1e-30)).max().item()
                    else:
                        key, val = f"{name}_ulps", _ulps(a.float(), b.float(), a.dtype)
                    stats[key] = max(stats.get(key, 0.0), val)
                moved = (ref[0].float() - p0.float(), ker[0].float() - p0.float())
            else:
                m0 = rnd(n, 1e-3).bfloat16()
                v0 = ((m0.float().abs() + rnd(n, 1e-3).abs()) ** 2).bfloat16()  # |m| <= sqrt(v)
                kahan = mode == "adamw_kahan"
                c0 = rnd(n, 1e-5).bfloat16() if kahan else None
                ref = [p0.clone(), m0.clone(), v0.clone()] + ([c0.clone()] if kahan else [])
                ker = [p0.clone(), m0.clone(), v0.clone()] + ([c0.clone()] if kahan else [])
                scal = torch.tensor([hyper["lr"], bc1, bc2_sqrt], device=device)
                genr = torch.Generator(device=device).manual_seed(seed)
                optim._adamw_update(
                    ref[0], g, ref[1], ref[2], ref[3] if kahan else None, scal, hyper["beta1"],
                    hyper["beta2"], hyper["eps"], hyper["weight_decay"], not kahan, genr,
                )  # fmt: skip
                adamw_lowp_step(
                    ker[0], g, ker[1], ker[2], ker[3] if kahan else None, bc1=bc1, bc2_sqrt=bc2_sqrt,
                    stochastic_param=not kahan, seed=seed, **hyper,
                )  # fmt: skip
                for name, a, b in zip(["weight", "exp_avg", "exp_avg_sq"], ref, ker):
                    key = f"{name}_ulps"
                    stats[key] = max(stats.get(key, 0.0), _ulps(a.float(), b.float(), torch.bfloat16))
                if kahan:  # weight + compensation is deterministic: in ulps of the weight
                    va, vb = ref[0].float() + ref[3].float(), ker[0].float() + ker[3].float()
                    ulp = torch.exp2(torch.floor(torch.log2(p0.float().abs().clamp_min(2.0**-126))) - 7)
                    key = "kahan_value_weight_ulps"
                    stats[key] = max(stats.get(key, 0.0), ((va - vb).abs() / ulp).max().item())
                moved = (ref[0].float() - p0.float(), ker[0].float() - p0.float())
            if n >= 4096:  # a mean over enough elements
                key = "mean_update_diff_rel"
                denom = moved[0].abs().mean().item() or 1.0
                stats[key] = max(stats.get(key, 0.0), abs((moved[0] - moved[1]).mean().item()) / denom)
        out[mode] = stats
    return out
