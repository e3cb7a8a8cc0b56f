"""AdamW variants for full fine-tuning: fp32, pure bf16, bf16 with Kahan-compensated or stochastically
rounded updates, and bf16 weights with 8-bit (FP8 e4m3) block-wise moments.

`build_optimizer(params, name, lr, betas, weight_decay, eps)` returns a `torch.optim.Optimizer`.
`params` is anything `torch.optim` accepts: an iterable of tensors or of param-group dicts
(which parameters get weight decay is the caller's choice, made through the groups).
`state_bytes_per_param(name)` is the optimizer-state column of the table below (for the memory plan).

Modes and their memory, in bytes per parameter (weights + optimizer state; gradients add the
parameter's own size on top: 4 for fp32, 2 for bf16):

| name          | weights | exp_avg | exp_avg_sq | extra | state | total | update quality |
| ------------- | ------- | ------- | ---------- | ----- | ----- | ----- | -------------- |
| `adamw`       | 4 (fp32)| 4       | 4          | -     | 8     | 12    | fp32 (reference) |
| `adamw_bf16`  | 2       | 2       | 2          | -     | 4     | 6     | updates below half a bf16 ulp of the weight are lost |
| `adamw_kahan` | 2       | 2 (or 4)| 2 (or 4)   | 2 (compensation) | 6 (10) | 8 (12 with fp32 moments) | ~fp32 |
| `adamw_sr`    | 2       | 2 (or 4)| 2 (or 4)   | -     | 4 (8) | 6 (10)| fp32 in expectation (stochastic rounding) |
| `adamw_8bit`  | 2       | 1 (e4m3)| 1 (e4m3 sqrt) | 8/256 (two fp32 scales per 256) | 2.03 | 4.03 | fp32 in expectation, noisier moments |

For comparison, mixed precision with an fp32 master copy costs 2 (bf16 weights) + 4 (master) +
4 + 4 = 14 bytes per parameter, plus fp32 gradients. Llama-3-8B (8.03 B parameters), bf16 weights and
gradients: 32 GB + state 48 (kahan), 32 (sr), 16.3 (8bit) GB.

`adamw` and `adamw_bf16` are `torch.optim.AdamW` (fused kernel when every parameter is on CUDA,
foreach otherwise); they differ only in the dtype the caller gives the parameters, and the state
follows the parameter's dtype. `adamw_bf16` is what the 2023 recipe did and is kept for comparison.

`adamw_kahan` (`KahanAdamW`) keeps bf16 weights but carries, per bf16 parameter, a bf16 buffer
holding what the last rounding of the weight threw away; it is added back into the next update
(Kahan summation), so the sum of all updates reaches the weight as in fp32. All arithmetic of a
step is done in fp32 per tensor; moments are stored in `moment_dtype` (bf16 by default). Moments
stored in bf16 are written with stochastic rounding: with round-to-nearest a bf16 `exp_avg_sq`
with beta2 = 0.999 can never decrease (0.999 * v rounds back to v), which stalls Adam.
fp32 parameters in a Kahan optimizer get plain fp32 AdamW (no compensation buffer).
`adamw_sr` is the same class without the buffer: the new weight is rounded stochastically.

`adamw_8bit` (`AdamW8bit`) stores m and r = sqrt(v) (not v: m and r span the same range) as
float8_e4m3fn with one fp32 scale (absmax / 448) per block of 256 elements, requantised each step with
stochastic rounding; the weight update is computed in fp32 from the new moments before they are
quantised, and written to the bf16 weight with stochastic rounding (see the class docstring).

Stochastic rounding bits: each step of each parameter draws from a seed derived from the optimizer's
`seed` (kept in every param group, hence in `state_dict()`), the step and the parameter's index, so
`state_dict()` / `load_state_dict()` resume bit-exactly on the same device with no RNG to restore, and
the step in backward gives the same bits as `step()`. (The "compile" kernel and the eager update of
FSDP2 DTensor parameters in the kahan/sr modes draw from torch's global generator instead.)

Kernels (`kernel=`): on CUDA every low-precision mode runs one Triton kernel launch per parameter
tensor (`sft/training/fused_adamw.py`: reads and writes each byte once); elsewhere the same arithmetic
runs in eager torch (`_adamw_update`, `_adamw8bit_update`: the references the kernels are tested
against). `kernel="compile"` (or the older `compile=True`) keeps the `torch.compile`d pointwise update
of the kahan/sr modes (dynamic shapes, one compilation for all tensors; also on CPU through
inductor's C++ backend), compiled with inductor's `emulate_precision_casts`, without which inductor
drops the bf16 rounding that the Kahan compensation measures (see `_COMPILE_OPTIONS`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

import torch

from sft.training import fused_adamw

logger = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "adamw_bf16", "adamw_kahan", "adamw_sr", "adamw_8bit")
QBLOCK = fused_adamw.QBLOCK  # elements per fp32 scale of adamw_8bit's moments
FP8_MAX = fused_adamw.FP8_MAX
KERNELS = ("triton", "compile", "torch")


def state_bytes_per_param(name: str, param_dtype: torch.dtype = torch.bfloat16) -> float:
    """Optimizer state in bytes per parameter of `param_dtype` (bf16 default), weights and grads excluded.

    adamw / adamw_bf16: two moments of the weight's dtype (4 for bf16, 8 for fp32); adamw_sr: 4
    (bf16 moments); adamw_kahan: 6 (bf16 moments + compensation); adamw_8bit: 2 + 8/256 (two e4m3
    moments + two fp32 scales per 256). With fp32 weights the kahan/sr modes keep fp32 moments (8).
    The default `moment_dtype` is assumed; padding of the last 8-bit block is ignored.
    """
    size = torch.finfo(param_dtype).bits // 8
    if name in ("adamw", "adamw_bf16"):
        return 2.0 * size
    if name in ("adamw_kahan", "adamw_sr"):
        if param_dtype == torch.float32:
            return 8.0
        return 4.0 + (size if name == "adamw_kahan" else 0)
    if name == "adamw_8bit":
        return 2.0 + 8.0 / QBLOCK
    raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}")


def _step_seed(seed: int, step: int, index: int) -> int:
    """A 31-bit seed for (optimizer seed, step, parameter index): splitmix64 of the three, mixed."""
    mask = (1 << 64) - 1
    x = 0
    for v in (seed, step, index):
        x = (x ^ (v & mask)) * 0x9E3779B97F4A7C15 & mask
        x ^= x >> 30
        x = x * 0xBF58476D1CE4E5B9 & mask
        x ^= x >> 27
        x = x * 0x94D049BB133111EB & mask
        x ^= x >> 31
    return x & 0x7FFFFFFF


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "to_local")


def _local(t: torch.Tensor | None) -> torch.Tensor | None:
    """The local shard of a DTensor (FSDP2 parameter, its grad or state); other tensors unchanged."""
    return t.to_local() if t is not None and _is_dtensor(t) else t


def _all_cuda(params: list[Any]) -> bool:
    tensors = []
    for p in params:
        if isinstance(p, dict):
            tensors.extend(p["params"])
        else:
            tensors.append(p)
    return len(tensors) > 0 and all(t.is_cuda for t in tensors)


def build_optimizer(
    params: Iterable[Any],
    name: str = "adamw",
    lr: float = 1e-5,
    betas: tuple[float, float] = (0.9, 0.95),
    weight_decay: float = 0.0,
    eps: float = 1e-8,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """Build the optimizer `name` (one of `OPTIMIZERS`) over `params` (tensors or param groups).

    Weight decay is decoupled (AdamW): each step multiplies the weight by `1 - lr * weight_decay`
    before the Adam update, exactly as `torch.optim.AdamW`. Extra keyword arguments go to
    `KahanAdamW` for the bf16 modes (`moment_dtype`, `compile`, `kernel`, `seed`) and to `AdamW8bit`
    (`kernel`, `seed`).
    """
    params = list(params)
    if name in ("adamw", "adamw_bf16"):
        if kwargs:
            raise ValueError(f"unexpected options for {name}: {sorted(kwargs)}")
        impl = {"fused": True} if _all_cuda(params) else {"foreach": True}
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps, **impl)
    if name == "adamw_kahan":
        return KahanAdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps, **kwargs)
    if name == "adamw_sr":
        return KahanAdamW(
            params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps, rounding="stochastic", **kwargs
        )
    if name == "adamw_8bit":
        return AdamW8bit(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps, **kwargs)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}")


def _round_stochastic_bf16(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """fp32 -> bf16, rounding up with probability equal to the dropped fraction (unbiased).

    Adds 16 random low bits to the fp32 bit pattern and truncates; fp32 is sign-magnitude, so
    this rounds the magnitude and is symmetric in sign. The bits come from `generator`, or from
    torch's global generator when None (what the compiled path uses).
    """
    bits = x.view(torch.int32)
    if generator is None:
        # rand_like (not randint_like) because inductor lowers it to its philox generator everywhere.
        noise = (torch.rand_like(x) * 65536).to(torch.int32)
    else:
        noise = torch.randint(0, 65536, x.shape, generator=generator, device=x.device, dtype=torch.int32)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)


def _round_stochastic_e4m3(q: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """fp32 in [-448, 448] -> float8_e4m3fn, rounding up with probability equal to the dropped fraction.

    Normal range (|q| >= 2^-6): add 20 random bits below e4m3's 3-bit mantissa to the fp32 pattern,
    truncate, clamp to +-448 (only a value already at the block maximum can round past it). e4m3
    subnormals (|q| < 2^-6) lie on a fixed grid of 2^-9: there q -> floor(q * 512 + u) / 512 with the
    same 20 bits as u in [0, 1), also unbiased. The result is exactly representable, so the final
    cast does not round. Identical arithmetic in the Triton kernel (`fused_adamw._sr_e4m3`).
    """
    noise = torch.randint(0, 1 << 20, q.shape, generator=generator, device=q.device, dtype=torch.int32)
    t = ((q.view(torch.int32) + noise) & -(1 << 20)).view(torch.float32).clamp(-FP8_MAX, FP8_MAX)
    sub = torch.floor(q * 512.0 + noise.float() * 2.0**-20) * (1 / 512)
    return torch.where(q.abs() < 2.0**-6, sub, t).to(torch.float8_e4m3fn)


def _quantize_blockwise(
    x: torch.Tensor, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 of a multiple of 256 elements -> (e4m3 values, fp32 scale per 256), scale = absmax / 448.

    Each block is multiplied by 448 / its absmax, then rounded stochastically with `generator` (round
    to nearest when None, for tests and initial states); an all-zero block (or one of absmax <= 2^-100,
    far below any Adam moment) is stored as 0.
    """
    xb = x.view(-1, QBLOCK)
    amax = xb.abs().amax(dim=1)
    # one reciprocal per block (as the kernel); a block with absmax <= 2^-100 is stored as 0
    inv = torch.where(amax > 2.0**-100, FP8_MAX / amax, 0.0)
    q = xb * inv[:, None]
    if generator is None:
        qq = q.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    else:
        qq = _round_stochastic_e4m3(q, generator)
    return qq.view(-1), amax / FP8_MAX


def _dequantize_blockwise(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of `_quantize_blockwise`: fp32 of the same (padded) length."""
    return (q.float().view(-1, QBLOCK) * scale[:, None]).view(-1)


def _ratio_bound(beta1: float, beta2: float, step: int) -> float:
    """The largest |m_hat| / sqrt(v_hat) fp32 Adam can reach at `step` (Cauchy-Schwarz over the gradients).

    m_t = (1-b1) sum b1^k g_{t-k}, v_t = (1-b2) sum b2^k g_{t-k}^2, so |m_t| <= (1-b1)/sqrt(1-b2)
    sqrt(sum_{k<t} (b1^2/b2)^k) sqrt(v_t); with bias corrections the ratio is at most that times
    sqrt(1-b2^t)/(1-b1^t) (1 at step 1). The 8-bit mode clamps its normalised update there: a no-op
    for any state fp32 Adam can reach, and a guard against an r quantised to 0 under a large m.
    """
    if beta2 == 0:
        return math.inf
    q = beta1 * beta1 / beta2
    s = step if q == 1 else (1 - q**step) / (1 - q)
    return (
        (1 - beta1) * math.sqrt(1 - beta2**step) / ((1 - beta1**step) * math.sqrt(1 - beta2)) * math.sqrt(s)
    )


def _store(
    x: torch.Tensor, dtype: torch.dtype, stochastic: bool, generator: torch.Generator | None = None
) -> torch.Tensor:
    if dtype == torch.bfloat16 and stochastic:
        return _round_stochastic_bf16(x, generator)
    return x.to(dtype)


def _adamw_update(
    p: torch.Tensor,
    g: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    c: torch.Tensor | None,
    scalars: torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    stochastic_param: bool,
    generator: torch.Generator | None = None,
) -> None:
    """One AdamW step on one (flattened) tensor, in place; arithmetic in fp32.

    scalars = [lr, 1 - beta1**step, sqrt(1 - beta2**step)] (0-d tensors would recompile less,
    a 3-vector is one host-to-device copy per group). `c` is the Kahan compensation buffer, or
    None (fp32 parameter, or stochastic rounding of the weight).
    Same operation order as torch's AdamW: p *= 1 - lr*wd; p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps).
    """
    lr, bc1, bc2_sqrt = scalars[0], scalars[1], scalars[2]
    g32 = g.float()
    m32 = m.float() * beta1 + g32 * (1 - beta1)
    v32 = v.float() * beta2 + g32 * g32 * (1 - beta2)
    # Moments in bf16 get stochastic rounding (see module docstring); fp32 moments are exact.
    m.copy_(_store(m32, m.dtype, True, generator))
    v.copy_(_store(v32, v.dtype, True, generator))
    p32 = p.float()
    denom = v32.sqrt() / bc2_sqrt + eps
    update = -(lr * weight_decay) * p32 - (lr / bc1) * m32 / denom
    if p.dtype == torch.float32:
        p.copy_(p32 + update)
    elif c is not None:
        # Kahan: add the previously lost remainder, round, remember what this rounding lost.
        y = update + c.float()
        new_p = (p32 + y).to(p.dtype)
        c.copy_((y - (new_p.float() - p32)).to(c.dtype))
        p.copy_(new_p)
    elif stochastic_param and p.dtype == torch.bfloat16:
        p.copy_(_round_stochastic_bf16(p32 + update, generator))
    else:
        p.copy_((p32 + update).to(p.dtype))


def _adamw8bit_update(
    p: torch.Tensor,
    g: torch.Tensor,
    m_q: torch.Tensor,
    m_scale: torch.Tensor,
    r_q: torch.Tensor,
    r_scale: torch.Tensor,
    scalars: torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    bound: float,
    generator: torch.Generator | None,
) -> None:
    """One `adamw_8bit` step on one tensor, in place: the torch reference of `fused_adamw.adamw8bit_step`.

    m and r = sqrt(v) are stored as e4m3 with an fp32 scale per 256 elements (the last block padded
    with zeros, which stay zero). Arithmetic in fp32, as `_adamw_update`: the update uses the new
    moments before they are quantised; the normalised step (lr / bc1) * m / denom is clamped to
    +-lr * `bound` (`_ratio_bound`). The new moments and the weight (bf16) are rounded
    stochastically with `generator`'s bits, in that order: m, r, weight.
    """
    lr, bc1, bc2_sqrt = scalars[0], scalars[1], scalars[2]
    n, padded = p.numel(), m_q.numel()
    g32 = torch.zeros(padded, dtype=torch.float32, device=p.device)
    g32[:n] = g.reshape(-1)
    p32 = p.reshape(-1).float()
    m = _dequantize_blockwise(m_q, m_scale)
    r = _dequantize_blockwise(r_q, r_scale)
    m32 = m * beta1 + g32 * (1 - beta1)
    v32 = r * r * beta2 + g32 * g32 * (1 - beta2)
    r32 = v32.sqrt()
    denom = r32 / bc2_sqrt + eps
    lim = lr * bound
    step = torch.minimum(torch.maximum((lr / bc1) * m32 / denom, -lim), lim)
    q, s = _quantize_blockwise(m32, generator)
    m_q.copy_(q)
    m_scale.copy_(s)
    q, s = _quantize_blockwise(r32, generator)
    r_q.copy_(q)
    r_scale.copy_(s)
    new = p32 + (-(lr * weight_decay) * p32 - step[:n])
    if p.dtype == torch.bfloat16:
        p.copy_(_round_stochastic_bf16(new, generator).view(p.shape))
    else:
        p.copy_(new.view(p.shape))


_compiled_update = None

# Inductor by default elides a user's fp32 -> bf16 -> fp32 cast pair inside a fused kernel (it
# keeps the fp32 value: "compute types" in Triton, a CSE shortcut in the C++ backend). The Kahan
# term `new_p.float() - p32` then equals `y` exactly, the compensation is always 0 and the update
# silently degrades to plain bf16 rounding. `emulate_precision_casts` keeps every low-precision
# cast as eager does (and turns off FMA contraction in Triton), so the compiled kernel computes
# the eager arithmetic; this pointwise kernel is memory-bound, so the extra casts cost nothing.
_COMPILE_OPTIONS = {"emulate_precision_casts": True}


def _get_compiled_update():
    """The `torch.compile`d `_adamw_update` (inductor, dynamic shapes, one graph), built once."""
    global _compiled_update
    if _compiled_update is None:
        _compiled_update = torch.compile(
            _adamw_update, dynamic=True, fullgraph=True, options=_COMPILE_OPTIONS
        )
    return _compiled_update


class KahanAdamW(torch.optim.Optimizer):
    """AdamW for low-precision (bf16) weights with Kahan-compensated or stochastically rounded updates.

    Args:
        params: tensors or param groups (any group may override lr, betas, weight_decay, eps).
        lr, betas, weight_decay, eps: as `torch.optim.AdamW` (decoupled weight decay).
        moment_dtype: dtype of exp_avg and exp_avg_sq for low-precision parameters (bf16 default:
            2 bytes each; torch.float32: 4 each). fp32 parameters always get fp32 moments.
        rounding: "kahan" (a compensation buffer of the parameter's dtype per bf16/fp16 parameter,
            2 bytes/param) or "stochastic" (no buffer; the weight is rounded stochastically).
        kernel: "triton" (one fused kernel launch per tensor, `fused_adamw`; the default when every
            parameter is on CUDA and triton imports), "compile" (the `torch.compile`d update) or
            "torch" (eager; the default elsewhere). A tensor the chosen kernel cannot take (not
            contiguous, not on CUDA) gets the eager update.
        compile: the older switch: True = kernel "compile", False = kernel "torch".
        seed: of the stochastic rounding (kept in every param group, so saved in `state_dict()`);
            default: `torch.initial_seed()` (what `torch.manual_seed` set). Each step of each parameter rounds with
            bits from `_step_seed(seed, step, parameter index)`: same device, same bits, so a resumed
            run is bit-exact without restoring any RNG. (The "compile" kernel, and the eager update of
            FSDP2's DTensor parameters, draw from torch's global generator instead.)

    State per parameter: "step" (int), "exp_avg", "exp_avg_sq", and "compensation" in Kahan mode
    for non-fp32 parameters. Parameters without a gradient are skipped (their step does not advance).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-5,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.0,
        eps: float = 1e-8,
        moment_dtype: torch.dtype = torch.bfloat16,
        rounding: str = "kahan",
        compile: bool | None = None,
        kernel: str | None = None,
        seed: int | None = None,
    ) -> None:
        if rounding not in ("kahan", "stochastic"):
            raise ValueError(f"rounding must be 'kahan' or 'stochastic', got {rounding!r}")
        self._setup(params, lr, betas, weight_decay, eps, compile, kernel, seed)
        self.moment_dtype = moment_dtype
        self.rounding = rounding

    def _setup(self, params, lr, betas, weight_decay, eps, compile, kernel, seed) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"invalid hyper-parameters lr={lr} betas={betas} wd={weight_decay} eps={eps}")
        params = list(params)
        if kernel is None:
            if compile is not None:
                kernel = "compile" if compile else "torch"
            elif _all_cuda(params) and fused_adamw.triton_available():
                kernel = "triton"
            else:
                kernel = "torch"
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        if kernel == "triton" and not fused_adamw.triton_available():
            raise ValueError("kernel='triton' needs triton (not importable here): use kernel='torch'")
        if seed is None:  # torch.manual_seed's seed (read, not drawn: the global RNG stream is untouched)
            seed = torch.initial_seed() % (2**31 - 1)
        defaults = dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, eps=eps, seed=int(seed))
        super().__init__(params, defaults)
        self.kernel = kernel
        self.compile = kernel == "compile"

    def _init_state(self, p: torch.Tensor) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            mdtype = torch.float32 if p.dtype == torch.float32 else self.moment_dtype
            state["step"] = 0
            state["exp_avg"] = self._state_zeros(p, mdtype)
            state["exp_avg_sq"] = self._state_zeros(p, mdtype)
            if self.rounding == "kahan" and p.dtype != torch.float32:
                state["compensation"] = self._state_zeros(p, p.dtype)
        return state

    def _state_zeros(self, like: torch.Tensor, dtype: torch.dtype, numel: int | None = None) -> torch.Tensor:
        """A zero state tensor: shaped as ``like`` (a DTensor stays one), or flat of ``numel`` on its device.

        Every state tensor is made here: `offload.py` overrides it to put the state on the host.
        """
        if numel is None:
            return torch.zeros_like(like, dtype=dtype, memory_format=torch.contiguous_format)
        return torch.zeros(numel, dtype=dtype, device=like.device)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load state exactly: keeps each state tensor's saved dtype.

        torch's loader casts floating state to the parameter's dtype, which would round fp32
        moments of bf16 parameters to bf16; the saved tensors are put back as saved.
        """
        saved = {k: dict(v) for k, v in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params):
            for k, v in saved.get(pid, {}).items():
                if torch.is_tensor(v):
                    self.state[p][k] = v.to(device=p.device, copy=True)

    def _scalars(self, group: dict, step: int, device: torch.device) -> torch.Tensor:
        """[lr, 1 - beta1**step, sqrt(1 - beta2**step)] as an fp32 device tensor, cached per (group, step).

        Cached so that stepping parameter by parameter (``step_parameter`` from backward hooks)
        makes one host-to-device copy per step and device, not one per parameter.
        """
        beta1, beta2 = group["betas"]
        key = (id(group), step, device, group["lr"])
        cache = self.__dict__.setdefault("_scalars_cache", {})
        t = cache.get(key)
        if t is None:
            if len(cache) > 64:  # old steps are never asked for again
                cache.clear()
            t = torch.tensor(
                [group["lr"], 1 - beta1**step, (1 - beta2**step) ** 0.5], dtype=torch.float32, device=device
            )
            cache[key] = t
        return t

    def _seed(self, group: dict, p: torch.Tensor, step: int) -> int:
        """The seed of this parameter's stochastic rounding at `step` (see the class docstring)."""
        index = self.__dict__.get("_param_index")
        if index is None or len(index) != sum(len(g["params"]) for g in self.param_groups):
            index = {id(q): i for i, q in enumerate(q for g in self.param_groups for q in g["params"])}
            self._param_index = index
        seed = _step_seed(group.get("seed", 0), step, index[id(p)])
        if _is_dtensor(p) and torch.distributed.is_initialized():  # other shards, other bits
            seed = _step_seed(seed, torch.distributed.get_rank(), 0)
        return seed

    def _bias_corrections(self, group: dict, step: int) -> tuple[float, float]:
        beta1, beta2 = group["betas"]
        return 1 - beta1**step, (1 - beta2**step) ** 0.5

    def _update(self, group: dict, p: torch.Tensor) -> None:
        """Advance ``p``'s step and apply one AdamW update to it from ``p.grad`` (in place)."""
        if p.grad.is_sparse:
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
        state = self._init_state(p)
        state["step"] += 1
        self._apply(group, p, state)

    def _apply(self, group: dict, p: torch.Tensor, state: dict[str, Any]) -> None:
        """The update kernel: one step of ``p`` from ``p.grad`` with the tensors of ``state`` (its "step"
        already advanced), in place. `offload.py` passes device copies of the host-resident state."""
        beta1, beta2 = group["betas"]
        tensors = [p, p.grad, state["exp_avg"], state["exp_avg_sq"], state.get("compensation")]
        stochastic = self.rounding == "stochastic"
        if self.kernel == "triton":
            local = [_local(t) for t in tensors]
            if fused_adamw.can_run(*local):
                bc1, bc2_sqrt = self._bias_corrections(group, state["step"])
                fused_adamw.adamw_lowp_step(
                    *local, lr=group["lr"], bc1=bc1, bc2_sqrt=bc2_sqrt, beta1=beta1, beta2=beta2,
                    eps=group["eps"], weight_decay=group["weight_decay"], stochastic_param=stochastic,
                    seed=self._seed(group, p, state["step"]),
                )  # fmt: skip
                return
        generator = None
        if not _is_dtensor(p):
            generator = torch.Generator(device=p.device).manual_seed(self._seed(group, p, state["step"]))
        fn = _adamw_update
        if self.compile and p.is_contiguous() and p.grad.is_contiguous():
            # Flattened, every tensor is the same 1-D kernel: one dynamic-shape compilation.
            tensors = [None if t is None else t.view(-1) for t in tensors]
            fn = _get_compiled_update()
        hyper = (
            self._scalars(group, state["step"], p.device),
            beta1,
            beta2,
            group["eps"],
            group["weight_decay"],
        )
        if fn is _adamw_update:
            fn(*tensors, *hyper, stochastic, generator)
            return
        try:
            fn(*tensors, *hyper, stochastic)
        except Exception:
            # A compilation failure happens before the kernel mutates anything: redo this
            # tensor eagerly and stay eager (same arithmetic, more memory traffic).
            logger.warning("compiled KahanAdamW update failed; using the eager update", exc_info=True)
            self.compile = False
            self.kernel = "torch"
            _adamw_update(*tensors, *hyper, stochastic, generator)

    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step over every parameter that has a gradient; returns closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(group, p)
        return loss

    @torch.no_grad()
    def step_parameter(self, p: torch.Tensor) -> None:
        """Update the single parameter ``p`` from ``p.grad`` now (same arithmetic as ``step``).

        For the optimizer step inside backward (``step_in_backward``). A parameter without a
        gradient is skipped. Raises KeyError if ``p`` is not in this optimizer.
        """
        if p.grad is None:
            return
        group = self._group_of(p)
        self._update(group, p)

    def _group_of(self, p: torch.Tensor) -> dict:
        index = self.__dict__.get("_group_index")
        if index is None or len(index) != sum(len(g["params"]) for g in self.param_groups):
            index = {id(q): g for g in self.param_groups for q in g["params"]}
            self._group_index = index
        return index[id(p)]


class AdamW8bit(KahanAdamW):
    """AdamW for bf16 weights with 8-bit (FP8 e4m3) block-wise moments: 2.03 bytes of state per parameter.

    State per parameter: "step" (int); "exp_avg" (m) and "sqrt_exp_avg_sq" (r = sqrt(v)) as flat
    `float8_e4m3fn` tensors of the parameter's element count rounded up to a multiple of 256 (the
    padding stays 0); "exp_avg_scale" and "sqrt_exp_avg_sq_scale": one fp32 per block of 256
    (absmax / 448). Storing r rather than v gives m and r the same dynamic range (v spans twice
    the exponents of m, more than e4m3's). Each step, in fp32: dequantise, Adam update of m and v =
    r^2 with the gradient, update the weight from the new fp32 moments (normalised step clamped at
    `_ratio_bound`, a guard against an r rounded to 0 under a large m), then requantise m and r with
    stochastic rounding (`_round_stochastic_e4m3`) and write the bf16 weight with stochastic
    rounding (fp32 weights are written exactly). Torch reference: `_adamw8bit_update`; on CUDA the
    same step is one Triton kernel per tensor (`fused_adamw.adamw8bit_step`).

    Args as `KahanAdamW` (`kernel`: "triton" or "torch"; "compile" is not offered; `seed`).
    For FSDP2 (DTensor) parameters the state covers this rank's local shard.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-5,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.0,
        eps: float = 1e-8,
        kernel: str | None = None,
        seed: int | None = None,
    ) -> None:
        if kernel == "compile":
            raise ValueError("adamw_8bit has no compiled kernel: use kernel='triton' (CUDA) or 'torch'")
        self._setup(params, lr, betas, weight_decay, eps, None, kernel, seed)
        self.rounding = "8bit"
        self.moment_dtype = torch.float8_e4m3fn

    def _init_state(self, p: torch.Tensor) -> dict[str, Any]:
        """Zero state; for an FSDP2 parameter (DTensor sharded on dim 0 of a 1-D mesh) each rank's state
        covers its local shard, padded to the largest shard's block count, and is itself a DTensor
        sharded on dim 0 (equal shards): distributed checkpoints save every rank's part."""
        state = self.state[p]
        if not state:
            local = _local(p)
            wrap = None
            numel = local.numel()
            if _is_dtensor(p):
                mesh, placements = p.device_mesh, p.placements
                if mesh.ndim != 1 or not placements[0].is_shard(0) or p.ndim == 0:
                    raise ValueError(f"adamw_8bit supports DTensors sharded on dim 0 only, got {placements}")
                rows = -(-p.shape[0] // mesh.size())
                numel = rows * (p.numel() // max(p.shape[0], 1))  # the largest shard's element count
                wrap = mesh, placements
            nblocks = -(-numel // QBLOCK)
            state["step"] = 0
            for key in ("exp_avg", "sqrt_exp_avg_sq"):
                q = self._state_zeros(local, torch.float8_e4m3fn, nblocks * QBLOCK)
                s = self._state_zeros(local, torch.float32, nblocks)
                if wrap is not None:
                    from torch.distributed.tensor import DTensor

                    q = DTensor.from_local(q, wrap[0], wrap[1], run_check=False)
                    s = DTensor.from_local(s, wrap[0], wrap[1], run_check=False)
                state[key], state[key + "_scale"] = q, s
        return state

    def _apply(self, group: dict, p: torch.Tensor, state: dict[str, Any]) -> None:
        step = state["step"]
        beta1, beta2 = group["betas"]
        local_p, local_g = _local(p), _local(p.grad)
        keys = ("exp_avg", "exp_avg_scale", "sqrt_exp_avg_sq", "sqrt_exp_avg_sq_scale")
        moments = [_local(state[k]) for k in keys]
        bound = _ratio_bound(beta1, beta2, step)
        seed = self._seed(group, p, step)
        if self.kernel == "triton" and fused_adamw.can_run(local_p, local_g, *moments):
            bc1, bc2_sqrt = self._bias_corrections(group, step)
            fused_adamw.adamw8bit_step(
                local_p, local_g, *moments, lr=group["lr"], bc1=bc1, bc2_sqrt=bc2_sqrt, beta1=beta1,
                beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"], bound=bound, seed=seed,
            )  # fmt: skip
            return
        generator = torch.Generator(device=local_p.device).manual_seed(seed)
        scalars = self._scalars(group, step, local_p.device)
        _adamw8bit_update(
            local_p, local_g, *moments, scalars, beta1, beta2, group["eps"], group["weight_decay"], bound,
            generator,
        )  # fmt: skip


def step_in_backward(optimizer: KahanAdamW, params: Iterable[torch.Tensor]) -> list[Any]:
    """Run ``optimizer.step_parameter(p)`` as soon as each ``p``'s gradient is complete, then drop it.

    Uses ``Tensor.register_post_accumulate_grad_hook``: during ``loss.backward()`` every parameter
    is updated and its ``.grad`` set to None right after its gradient is accumulated, so the
    gradients of the whole model are never alive at once (peak memory falls by about one
    gradient copy: 2 bytes/param in bf16). Afterwards call neither ``optimizer.step()`` nor
    ``zero_grad()``; the update is bit-identical to ``step()`` in every mode (`adamw_kahan`, `adamw_sr`,
    `adamw_8bit`, Triton or torch kernel): the rounding bits depend on (seed, step, parameter), not on
    the order parameters are stepped in (only the "compile" kernel draws from the global RNG, in
    another order).
    What it cannot do: anything needing all gradients before the first update, i.e. gradient
    clipping by global norm and gradient accumulation over micro-batches.
    Returns the hook handles (``handle.remove()`` restores ordinary stepping).
    """

    def hook(p: torch.Tensor) -> None:
        optimizer.step_parameter(p)
        p.grad = None

    return [p.register_post_accumulate_grad_hook(hook) for p in params if p.requires_grad]


# ----------------------------------------------------------------------------- what the trainer calls


def lr_at(step: int, cfg, total_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up to ``lr``, then decay."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.decay == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps - 1)
    progress = min(max(progress, 0.0), 1.0)
    lo = cfg.min_lr_ratio
    if cfg.decay == "cosine":
        return cfg.lr * (lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * progress)))
    return cfg.lr * (1 - (1 - lo) * progress)


def build_for(root, cfg, build=None):
    """``(trainable params, optimizer)`` of ``cfg`` (a TrainConfig) over ``root``: weight decay on the matrices only.

    ``build``: the optimizer's builder, ``build_optimizer`` by default (``offload.build_for`` passes its own).
    """
    params = [p for p in root.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    build = build or build_optimizer
    return params, build(groups, cfg.optimizer, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


# ----------------------------------------------------------------------------- kernel check


def _ulps(
    a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, operands: torch.Tensor | None = None
) -> float:
    """Largest distance between a and b in units of the grid spacing of `dtype` at max(|a|, |b|, |operands|).

    The spacing is that of a normal number of `dtype` at the value (bf16: 2^-7 relative,
    e4m3: 2^-3 relative), floored at the smallest subnormal spacing (e4m3: 2^-9). `operands`: the
    magnitude of the terms summed into a and b: where they cancel (a weight that an update brings
    near 0), fp32 rounding of the terms, not the tiny result, sets the scale of the difference.
    """
    a, b = a.double(), b.double()
    mag = torch.maximum(a.abs(), b.abs())
    if operands is not None:
        mag = torch.maximum(mag, operands.double().abs())
    mant = {torch.bfloat16: 7, torch.float8_e4m3fn: 3}[dtype]
    tiny = {torch.bfloat16: 2.0**-133, torch.float8_e4m3fn: 2.0**-9}[dtype]
    exp = torch.floor(torch.log2(mag.clamp_min(tiny)))
    spacing = torch.maximum(torch.exp2(exp - mant), torch.tensor(tiny, dtype=torch.float64))
    return ((a - b).abs() / spacing).max().item() if a.numel() else 0.0


def kernel_bound(key: str) -> float:
    """The bound of one :func:`check_kernels` statistic: every stored value within 2 ulps of its format
    (stochastic rounding picks either neighbour; fp32 rounding may move the value across a grid point),
    Kahan's weight + compensation within 1/8 of a weight ulp, the 8-bit scales to 1e-6 relative, the mean
    weight change (unbiased rounding) to 5% (tests/test_optim.py pins the same numbers)."""
    if key.endswith("_ulps"):
        return 0.125 if key == "kahan_value_weight_ulps" else 2.0
    return 1e-6 if key.endswith("_scale_rel") else 0.05


def check_kernels(device: str = "cuda", numels: tuple[int, ...] = (1, 300, 4096, 70_001)) -> dict[str, Any]:
    """Run each kernel and its torch reference on the same inputs once; return the disagreement.

    One step from the same random state (weights ~ N(0, 0.02), moments of a few steps' size) for
    tensors of `numels` elements, per mode: the largest difference of every stored tensor, in ulps of
    its storage format (stochastic rounding may pick either neighbour: <= 1 expected, 2 allowed for
    fp32 rounding on top), and for the deterministic parts (Kahan weight + compensation, scales) the
    largest absolute difference. Also the mean of the weight change of both, over all elements
    (stochastic rounding is unbiased: the means agree to noise).
    """
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
                mq, ms = _quantize_blockwise(m0, None)
                rq, rs = _quantize_blockwise(r0, None)
                bound = _ratio_bound(hyper["beta1"], hyper["beta2"], step)
                ref = [p0.clone(), mq.clone(), ms.clone(), rq.clone(), rs.clone()]
                ker = [p0.clone(), mq.clone(), ms.clone(), rq.clone(), rs.clone()]
                scal = torch.tensor([hyper["lr"], bc1, bc2_sqrt], device=device)
                genr = torch.Generator(device=device).manual_seed(seed)
                _adamw8bit_update(
                    ref[0], g, *ref[1:], scal, hyper["beta1"], hyper["beta2"], hyper["eps"],
                    hyper["weight_decay"], bound, genr,
                )  # fmt: skip
                fused_adamw.adamw8bit_step(
                    ker[0], g, *ker[1:], bc1=bc1, bc2_sqrt=bc2_sqrt, bound=bound, seed=seed, **hyper
                )
                names = ["weight", "exp_avg", "exp_avg_scale", "sqrt_exp_avg_sq", "sqrt_exp_avg_sq_scale"]
                for name, a, b in zip(names, ref, ker):
                    if a.dtype == torch.float32:  # scales: deterministic
                        key, val = f"{name}_rel", ((a - b).abs() / a.abs().clamp_min(1e-30)).max().item()
                    else:
                        ops = p0.float() if name == "weight" else None  # p + update may cancel
                        key, val = f"{name}_ulps", _ulps(a.float(), b.float(), a.dtype, ops)
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
                _adamw_update(
                    ref[0], g, ref[1], ref[2], ref[3] if kahan else None, scal, hyper["beta1"],
                    hyper["beta2"], hyper["eps"], hyper["weight_decay"], not kahan, genr,
                )  # fmt: skip
                fused_adamw.adamw_lowp_step(
                    ker[0], g, ker[1], ker[2], ker[3] if kahan else None, bc1=bc1, bc2_sqrt=bc2_sqrt,
                    stochastic_param=not kahan, seed=seed, **hyper,
                )  # fmt: skip
                # terms that may cancel: p + update, beta1 * m + (1 - beta1) * g
                operands = [p0.float(), m0.float().abs() + g.float().abs(), None]
                for name, a, b, ops in zip(["weight", "exp_avg", "exp_avg_sq"], ref, ker, operands):
                    key = f"{name}_ulps"
                    stats[key] = max(stats.get(key, 0.0), _ulps(a.float(), b.float(), torch.bfloat16, ops))
                if kahan:  # weight + compensation is deterministic: in ulps of the weight
                    va, vb = ref[0].float() + ref[3].float(), ker[0].float() + ker[3].float()
                    key = "kahan_value_weight_ulps"
                    stats[key] = max(stats.get(key, 0.0), _ulps(va, vb, torch.bfloat16, p0.float()))
                moved = (ref[0].float() - p0.float(), ker[0].float() - p0.float())
            if n >= 4096:  # a mean over enough elements
                key = "mean_update_diff_rel"
                denom = moved[0].abs().mean().item() or 1.0
                stats[key] = max(stats.get(key, 0.0), abs((moved[0] - moved[1]).mean().item()) / denom)
        out[mode] = stats
    return out
