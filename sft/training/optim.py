"""AdamW variants for full fine-tuning: fp32, pure bf16, and bf16 with Kahan-compensated updates.

`build_optimizer(params, name, lr, betas, weight_decay, eps)` returns a `torch.optim.Optimizer`.
`params` is anything `torch.optim` accepts: an iterable of tensors or of param-group dicts
(which parameters get weight decay is the caller's choice, made through the groups).

Modes and their memory, in bytes per parameter (weights + optimizer state; gradients add the
parameter's own size on top: 4 for fp32, 2 for bf16):

| name          | weights | exp_avg | exp_avg_sq | compensation | total | update quality |
| ------------- | ------- | ------- | ---------- | ------------ | ----- | -------------- |
| `adamw`       | 4 (fp32)| 4       | 4          | -            | 12    | fp32 (reference) |
| `adamw_bf16`  | 2       | 2       | 2          | -            | 6     | updates below half a bf16 ulp of the weight are lost |
| `adamw_kahan` | 2       | 2 (or 4)| 2 (or 4)   | 2            | 8 (12 with fp32 moments) | ~fp32 |
| `adamw_sr`    | 2       | 2 (or 4)| 2 (or 4)   | -            | 6 (10)   | fp32 in expectation (stochastic rounding) |

For comparison, mixed precision with an fp32 master copy costs 2 (bf16 weights) + 4 (master) +
4 + 4 = 14 bytes per parameter, plus fp32 gradients.

`adamw` and `adamw_bf16` are `torch.optim.AdamW` (fused kernel when every parameter is on CUDA,
foreach otherwise); they differ only in the dtype the caller gives the parameters, and the state
follows the parameter's dtype. `adamw_bf16` is what the 2023 recipe did and is kept for comparison.

`adamw_kahan` (`KahanAdamW`) keeps bf16 weights but carries, per bf16 parameter, a bf16 buffer
holding what the last rounding of the weight threw away; it is added back into the next update
(Kahan summation), so the sum of all updates reaches the weight as in fp32. All arithmetic of a
step is done in fp32 per tensor; moments are stored in `moment_dtype` (bf16 by default). Moments
stored in bf16 are written with stochastic rounding: with round-to-nearest a bf16 `exp_avg_sq`
with beta2 = 0.999 can never decrease (0.999 * v rounds back to v), which stalls Adam.
The compensation buffers and moments are ordinary optimizer state, so `state_dict()` /
`load_state_dict()` resume exactly. fp32 parameters in a Kahan optimizer get plain fp32 AdamW
(no compensation buffer). Stochastic rounding draws from torch's global generator (of the
parameter's device): resume is bit-exact only if the RNG state is restored too.

On CUDA the per-tensor update is one `torch.compile`d pointwise kernel (dynamic shapes, so one
compilation for all tensors); elsewhere, or with `compile=False`, the same function runs eagerly
(`compile=True` forces the compiled kernel on any device, e.g. inductor's C++ backend on CPU). It is
compiled with inductor's `emulate_precision_casts`, without which inductor drops the bf16 rounding
that the Kahan compensation measures (see `_COMPILE_OPTIONS`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch

logger = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "adamw_bf16", "adamw_kahan", "adamw_sr")


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
    `KahanAdamW` for the bf16 modes (`moment_dtype`, `compile`).
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
    raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}")


def _round_stochastic_bf16(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16, rounding up with probability equal to the dropped fraction (unbiased).

    Adds 16 random low bits to the fp32 bit pattern and truncates; fp32 is sign-magnitude, so
    this rounds the magnitude and is symmetric in sign.
    """
    bits = x.view(torch.int32)
    # rand_like (not randint_like) because inductor lowers it to its philox generator everywhere.
    noise = (torch.rand_like(x) * 65536).to(torch.int32)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)


def _store(x: torch.Tensor, dtype: torch.dtype, stochastic: bool) -> torch.Tensor:
    if dtype == torch.bfloat16 and stochastic:
        return _round_stochastic_bf16(x)
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
    m.copy_(_store(m32, m.dtype, True))
    v.copy_(_store(v32, v.dtype, True))
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
        p.copy_(_round_stochastic_bf16(p32 + update))
    else:
        p.copy_((p32 + update).to(p.dtype))


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
        compile: compile the per-tensor update (default: True when every parameter is on CUDA).

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
    ) -> None:
        if rounding not in ("kahan", "stochastic"):
            raise ValueError(f"rounding must be 'kahan' or 'stochastic', got {rounding!r}")
        if lr < 0 or eps < 0 or weight_decay < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"invalid hyper-parameters lr={lr} betas={betas} wd={weight_decay} eps={eps}")
        params = list(params)
        defaults = dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, eps=eps)
        super().__init__(params, defaults)
        self.moment_dtype = moment_dtype
        self.rounding = rounding
        self.compile = _all_cuda(params) if compile is None else compile

    def _init_state(self, p: torch.Tensor) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            mdtype = torch.float32 if p.dtype == torch.float32 else self.moment_dtype
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, dtype=mdtype, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=mdtype, memory_format=torch.contiguous_format)
            if self.rounding == "kahan" and p.dtype != torch.float32:
                state["compensation"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
        return state

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

    def _update(self, group: dict, p: torch.Tensor) -> None:
        """Advance ``p``'s step and apply one AdamW update to it from ``p.grad`` (in place)."""
        if p.grad.is_sparse:
            raise RuntimeError("KahanAdamW does not support sparse gradients")
        state = self._init_state(p)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        tensors = [p, p.grad, state["exp_avg"], state["exp_avg_sq"], state.get("compensation")]
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
        stochastic = self.rounding == "stochastic"
        try:
            fn(*tensors, *hyper, stochastic)
        except Exception:
            if fn is _adamw_update:
                raise
            # A compilation failure happens before the kernel mutates anything: redo this
            # tensor eagerly and stay eager (same arithmetic, more memory traffic).
            logger.warning("compiled KahanAdamW update failed; using the eager update", exc_info=True)
            self.compile = False
            _adamw_update(*tensors, *hyper, stochastic)

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


def step_in_backward(optimizer: KahanAdamW, params: Iterable[torch.Tensor]) -> list[Any]:
    """Run ``optimizer.step_parameter(p)`` as soon as each ``p``'s gradient is complete, then drop it.

    Uses ``Tensor.register_post_accumulate_grad_hook``: during ``loss.backward()`` every parameter
    is updated and its ``.grad`` set to None right after its gradient is accumulated, so the
    gradients of the whole model are never alive at once (peak memory falls by about one
    gradient copy: 2 bytes/param in bf16). Afterwards call neither ``optimizer.step()`` nor
    ``zero_grad()``; the update is the same arithmetic as ``step()`` (bit-identical with fp32
    moments; with bf16 moments the stochastic-rounding draws come in another order).
    What it cannot do: anything needing all gradients before the first update, i.e. gradient
    clipping by global norm and gradient accumulation over micro-batches.
    Returns the hook handles (``handle.remove()`` restores ordinary stepping).
    """

    def hook(p: torch.Tensor) -> None:
        optimizer.step_parameter(p)
        p.grad = None

    return [p.register_post_accumulate_grad_hook(hook) for p in params if p.requires_grad]
