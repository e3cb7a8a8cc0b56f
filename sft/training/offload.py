"""Optimizer state in host memory: the low-precision AdamW modes with their state streamed through the GPU
once per step, so that weights and gradients alone fill the GPU (a 14.8 B model in bf16 on one 80 GB card).

Contracts:
- ``build_offloaded(params, name, lr, betas, weight_decay, eps, slots=2, **kwargs)``: as
  ``optim.build_optimizer`` for ``adamw_kahan``, ``adamw_sr`` and ``adamw_8bit`` (the classes
  ``OffloadedKahanAdamW`` and ``OffloadedAdamW8bit``); ``build_for(root, cfg)`` as ``optim.build_for``.
  ``adamw`` / ``adamw_bf16``, FSDP2 (DTensor) parameters and parameters on several devices raise ConfigError.
- Every state tensor (moments, 8-bit scales, Kahan compensation) lives on the CPU: in page-locked memory
  when the parameters are on CUDA (registered with ``cudaHostRegister`` at its exact size: torch's pinned
  allocator would round each tensor up to a power of two, up to 2x the host memory), plain otherwise.
  Where page-locking is refused, the state stays in pageable memory (one warning; same results, slower
  copies). "step" stays a Python int, as in ``optim``.
- ``step()``, per parameter with a gradient, in param-group order: copy its state into a staging slot on
  the parameter's device, run the update kernel of the non-offloaded optimizer on it (``_apply``: same
  kernel, same seeds), copy it back. The update is bit-identical to the non-offloaded optimizer's. On CUDA
  the uploads run on one side stream and the downloads on another, and the kernels on the current stream;
  with ``slots`` = 2 parameter i+1's upload overlaps parameter i's kernel and download. Events order them:
  a kernel waits for its upload; a download for its kernel; an upload into a slot for the slot's last
  download. ``step()`` returns once every download is complete (the host state is then final). On CPU the
  same path runs with plain copies and no streams. Gradients are read as they are when ``step()`` is called
  (clip them first; accumulation needs nothing).
- Staging: ``slots`` byte buffers on the parameters' device, allocated at the start of each step and given
  back to torch's caching allocator at its end (so the next step's activations reuse that memory: the GPU peak
  is the larger of backward's and the step's, not their sum), each the largest parameter's state bytes (every
  tensor of it rounded up to 16 bytes, ``ALIGN``: no rounding for a multiple of 8 elements, or of 1,024 in
  ``adamw_8bit``). ``offload_gpu_bytes(params, name)`` is that total: the GPU memory the optimizer needs
  beyond weights and gradients (Qwen3-14B, embedding 151,936 x 5,120: 2 x 4.35 GiB kahan, 2 x 2.90 sr, 2 x
  1.47 8bit). The host holds the whole state instead (``optim.state_bytes_per_param``; Qwen3-14B: 82.7 GiB
  kahan, 55.1 sr, 28.0 8bit). A loaded state of other dtypes (fp32 moments saved, bf16 configured: kept as
  saved, as ``optim`` does) resizes the slots.
- ``state_dict()`` is the host state (the format of the non-offloaded optimizer, on the CPU);
  ``load_state_dict()`` copies into host tensors (never onto the GPU: torch's loader would put the whole
  state there) and resumes bit-exactly; state of either optimizer loads into the other.
- Not supported: the step in backward (``step_parameter`` raises), FSDP2. ``offload_refusal(name,
  in_backward, world)`` says why offload is not allowed (None when it is), for the memory plan.
- ``offload_seconds(n_params, name)``: the host-link time of one step's state traffic, an estimate from
  the link bandwidth measured on the H100 machine (49.9 GiB/s to the GPU, 42.8 back, pinned), not a
  measurement of the offloaded step.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterable
from typing import Any

import torch

from sft.config import ConfigError
from sft.training import optim

log = logging.getLogger("sft")

OFFLOAD_OPTIMIZERS = ("adamw_kahan", "adamw_sr", "adamw_8bit")
ALIGN = 16  # bytes: each staged tensor starts at a multiple (the kernels' vector loads)
H2D_GIB_S = 49.9  # host -> H100, pinned, measured
D2H_GIB_S = 42.8  # H100 -> host, pinned, measured
GIB = 2**30


def offload_refusal(name: str, in_backward: bool = False, world: int = 1) -> str | None:
    """Why the optimizer state cannot live on the host for this run (None when it can)."""
    if name not in OFFLOAD_OPTIMIZERS:
        return f"--optimizer={name} (host-resident state is offered for {', '.join(OFFLOAD_OPTIMIZERS)})"
    if in_backward:
        return "the optimizer step in backward (the offloaded step streams all state once per step)"
    if world > 1:
        return "FSDP2 (several processes): each rank's state is a DTensor shard"
    return None


def _refuse(name: str) -> None:
    problem = offload_refusal(name)
    if problem is not None:
        raise ConfigError(f"offloaded optimizer state does not support {problem}")


def offload_seconds(
    n_params: int,
    name: str,
    h2d_gib_s: float = H2D_GIB_S,
    d2h_gib_s: float = D2H_GIB_S,
    param_dtype: torch.dtype = torch.bfloat16,
    duplex: bool = False,
) -> float:
    """Seconds the host link needs per optimizer step: the state goes up once and comes back once.

    An estimate from the measured link bandwidths, not a measurement of the offloaded step. Uploads and
    downloads run on two streams; whether the link carries both directions at full speed at once was not
    measured, so the default adds the two times (``duplex=True``: the slower direction alone). The
    update kernels overlap the copies and are not counted. Qwen3-14B (14.8 B) kahan: 82.7 GiB each way,
    3.6 s (1.9 s duplex).
    """
    nbytes = n_params * optim.state_bytes_per_param(name, param_dtype)
    up, down = nbytes / (h2d_gib_s * GIB), nbytes / (d2h_gib_s * GIB)
    return max(up, down) if duplex else up + down


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def state_specs(
    params: Iterable[Any], name: str, **kwargs: Any
) -> list[list[tuple[torch.Size, torch.dtype]]]:
    """(shape, dtype) of each state tensor of each parameter (tensors, or param-group dicts), in state order.

    Read from the optimizer itself, built over meta copies of the parameters (nothing is allocated):
    ``kwargs`` as ``build_optimizer`` (``moment_dtype`` matters).
    """
    _refuse(name)
    metas = [torch.empty(p.shape, dtype=p.dtype, device="meta") for p in _flat(params)]
    kwargs = {k: v for k, v in kwargs.items() if k == "moment_dtype"}
    twin = optim.build_optimizer(metas, name, kernel="torch", seed=0, **kwargs)
    return [[(t.shape, t.dtype) for t in twin._init_state(m).values() if torch.is_tensor(t)] for m in metas]


def slot_bytes(specs: Iterable[list[tuple[torch.Size, torch.dtype]]]) -> int:
    """Bytes of one staging slot: the largest parameter's state, each tensor rounded up to ``ALIGN``."""
    per_param = (sum(_aligned(s.numel() * d.itemsize) for s, d in spec) for spec in specs)
    return max(per_param, default=0)


def offload_gpu_bytes(params: Iterable[Any], name: str, slots: int = 2, **kwargs: Any) -> int:
    """GPU bytes the offloaded optimizer allocates: ``slots`` x the largest parameter's state (16-byte aligned).

    ``params``: the trainable parameters (any device, meta included) or param groups.
    """
    return slots * slot_bytes(state_specs(params, name, **kwargs))


def _flat(params: Iterable[Any]) -> list[torch.Tensor]:
    out = []
    for p in params:
        out.extend(p["params"] if isinstance(p, dict) else [p])
    return out


class _HostMemory:
    """Allocates host state tensors; page-locks them (``cudaHostRegister``, exact size) when ``pin``."""

    def __init__(self, pin: bool) -> None:
        self.pin = pin
        self.pinned: dict[int, torch.Tensor] = {}  # data_ptr -> tensor, until released

    def zeros(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
        t = torch.zeros(shape, dtype=dtype)
        if self.pin and t.numel():
            err = int(torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 1))
            if err != 0:  # e.g. a sandbox that refuses page-locking: correct, slower (synchronous) copies
                self.pin = False
                log.warning(
                    "offloaded optimizer state: page-locking %d bytes of host memory failed (CUDA error %d); "
                    "the state stays in pageable memory, its copies are slower", t.numel() * t.element_size(), err,
                )  # fmt: skip
                return t
            self.pinned[t.data_ptr()] = t
        return t

    def release(self, t: torch.Tensor) -> None:
        if self.pinned.pop(t.data_ptr(), None) is not None:
            torch.cuda.cudart().cudaHostUnregister(t.data_ptr())

    def release_all(self) -> None:
        for t in list(self.pinned.values()):
            self.release(t)


class _Staging:
    """``slots`` byte buffers on ``device`` for the state of one parameter each; on CUDA also the upload and
    download streams and one event per slot and stage (uploaded, computed, downloaded)."""

    def __init__(self, device: torch.device, nbytes: int, slots: int) -> None:
        self.device, self.nbytes, self.slots = device, nbytes, slots
        self.buffers: list[torch.Tensor] = []
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.h2d, self.d2h = torch.cuda.Stream(device), torch.cuda.Stream(device)
            self.uploaded, self.computed, self.downloaded = (
                [torch.cuda.Event() for _ in range(slots)] for _ in range(3)
            )

    def allocate(self) -> None:
        """The slots' buffers, for one step (:meth:`release` gives them back at its end)."""
        if not self.buffers:
            self.buffers = [
                torch.empty(self.nbytes, dtype=torch.uint8, device=self.device) for _ in range(self.slots)
            ]

    def release(self) -> None:
        """Give the buffers back to the allocator; only after :meth:`finish` (no copy or kernel still reads them)."""
        self.buffers = []

    def views(self, slot: int, host: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Slot ``slot`` carved into tensors shaped as ``host``'s, in order, each at a multiple of ALIGN."""
        out, off, buf = {}, 0, self.buffers[slot]
        for key, t in host.items():
            n = t.numel() * t.element_size()
            out[key] = buf[off : off + n].view(t.dtype).view(t.shape)
            off += _aligned(n)
        return out

    def upload(self, slot: int, host: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        staged = self.views(slot, host)
        if not self.cuda:
            for key, t in host.items():
                staged[key].copy_(t)
            return staged
        with torch.cuda.stream(self.h2d):
            self.h2d.wait_event(self.downloaded[slot])  # the slot's last user is back on the host
            for key, t in host.items():
                staged[key].copy_(t, non_blocking=True)
            self.uploaded[slot].record(self.h2d)
        return staged

    def compute(self, slot: int, kernel, *args: Any) -> None:
        """Run ``kernel(*args)`` on the current stream once the slot's upload is complete."""
        if not self.cuda:
            kernel(*args)
            return
        stream = torch.cuda.current_stream(self.device)
        stream.wait_event(self.uploaded[slot])
        kernel(*args)
        self.computed[slot].record(stream)

    def download(self, slot: int, staged: dict[str, torch.Tensor], host: dict[str, torch.Tensor]) -> None:
        if not self.cuda:
            for key, t in host.items():
                t.copy_(staged[key])
            return
        with torch.cuda.stream(self.d2h):
            self.d2h.wait_event(self.computed[slot])
            for key, t in host.items():
                t.copy_(staged[key], non_blocking=True)
            self.downloaded[slot].record(self.d2h)

    def finish(self) -> None:
        """Wait until every download is on the host."""
        if self.cuda:
            self.d2h.synchronize()


class _HostResident:
    """The offloading half of ``OffloadedKahanAdamW`` / ``OffloadedAdamW8bit`` (module docstring)."""

    def _offload_setup(self, name: str, slots: int, moment_dtype: torch.dtype | None) -> None:
        params = [p for g in self.param_groups for p in g["params"]]
        if any(optim._is_dtensor(p) for p in params):
            raise ConfigError("offloaded optimizer state does not support FSDP2 (DTensor) parameters")
        devices = {p.device for p in params}
        if len(devices) > 1:
            raise ConfigError(f"offloaded optimizer state needs every parameter on one device, got {devices}")
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.device = devices.pop() if devices else torch.device("cpu")
        self.offload_name, self.slots = name, slots
        self._spec_kwargs = {} if moment_dtype is None else {"moment_dtype": moment_dtype}
        self._host = _HostMemory(pin=self.device.type == "cuda")
        self._staging: _Staging | None = None
        self._slot_need = (-1, 0)  # (parameter count, slot bytes) of the last sizing
        weakref.finalize(self, self._host.release_all)

    def _state_zeros(self, like: torch.Tensor, dtype: torch.dtype, numel: int | None = None) -> torch.Tensor:
        return self._host.zeros(like.shape if numel is None else (numel,), dtype)

    def _staging_slots(self) -> _Staging:
        """The staging slots, made at the first step for the largest parameter (again only if one grows)."""
        params = [p for g in self.param_groups for p in g["params"]]
        if self._slot_need[0] != len(params):  # read once, again after add_param_group or a load
            held = [
                [(t.shape, t.dtype) for t in st.values() if torch.is_tensor(t)] for st in self.state.values()
            ]
            specs = state_specs(params, self.offload_name, **self._spec_kwargs)
            self._slot_need = len(params), max(slot_bytes(specs), slot_bytes(held))
        nbytes = self._slot_need[1]
        if self._staging is None or self._staging.nbytes < nbytes:
            self._staging = None  # free the old slots first
            self._staging = _Staging(self.device, nbytes, self.slots)
        self._staging.allocate()
        return self._staging

    def gpu_bytes(self) -> int:
        """Bytes of the staging slots a step allocates on the parameters' device (0 before the first step)."""
        return 0 if self._staging is None else self._staging.nbytes * self._staging.slots

    def _host_tensors(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self._init_state(p).items() if torch.is_tensor(v)}

    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step over every parameter that has a gradient, state streamed (module docstring)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = [(g, p) for g in self.param_groups for p in g["params"] if p.grad is not None]
        if any(p.grad.is_sparse for _, p in work):
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
        if not work:
            return loss
        staging = self._staging_slots()
        staged: dict[int, dict[str, torch.Tensor]] = {}
        ahead = 0  # uploads enqueued so far: parameter i+slots-1 goes up before parameter i's kernel
        try:
            for i, (group, p) in enumerate(work):
                while ahead < min(len(work), i + staging.slots):
                    staged[ahead] = staging.upload(ahead % staging.slots, self._host_tensors(work[ahead][1]))
                    ahead += 1
                state, views = self.state[p], staged.pop(i)
                state["step"] += 1
                staging.compute(i % staging.slots, self._apply, group, p, {"step": state["step"], **views})
                staging.download(i % staging.slots, views, self._host_tensors(p))
        finally:
            staging.finish()
            staging.release()
        return loss

    def step_parameter(self, p: torch.Tensor) -> None:
        raise ConfigError(
            "offloaded optimizer state cannot step inside backward: it streams the state once per step()"
        )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load exactly (saved dtypes kept), into host tensors: the state never goes to the parameters' device.

        torch's loader is given the param groups only; each saved state tensor is then copied into this
        optimizer's host tensor of the same shape and dtype (made, pinned, where there is none).
        """
        old = dict(self.state)
        torch.optim.Optimizer.load_state_dict(self, {**state_dict, "state": {}})
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params):
            saved = state_dict["state"].get(pid)
            if saved:
                self.state[p] = self._load_one(saved, old.pop(p, {}))
        for state in old.values():
            self._release(state)
        self._slot_need = (-1, 0)  # a loaded state may hold other dtypes: size the slots again

    def _load_one(self, saved: dict[str, Any], previous: dict[str, Any]) -> dict[str, Any]:
        """One parameter's state from ``saved``, reusing ``previous``'s host tensors where they match."""
        state = {}
        for key, value in saved.items():
            if not torch.is_tensor(value):
                state[key] = value
                continue
            t = previous.pop(key, None)
            if t is None or t.shape != value.shape or t.dtype != value.dtype:
                if t is not None:
                    self._host.release(t)
                t = self._host.zeros(value.shape, value.dtype)
            state[key] = t.copy_(value)
        self._release(previous)
        return state

    def _release(self, state: dict[str, Any]) -> None:
        for value in state.values():
            if torch.is_tensor(value):
                self._host.release(value)


class OffloadedKahanAdamW(_HostResident, optim.KahanAdamW):
    """``optim.KahanAdamW`` (``adamw_kahan``, ``adamw_sr``) with host-resident state; ``slots``: staging buffers."""

    def __init__(self, params: Iterable[Any], *args: Any, slots: int = 2, **kwargs: Any) -> None:
        super().__init__(params, *args, **kwargs)
        name = "adamw_kahan" if self.rounding == "kahan" else "adamw_sr"
        self._offload_setup(name, slots, self.moment_dtype)


class OffloadedAdamW8bit(_HostResident, optim.AdamW8bit):
    """``optim.AdamW8bit`` (``adamw_8bit``) with host-resident state; ``slots``: staging buffers."""

    def __init__(self, params: Iterable[Any], *args: Any, slots: int = 2, **kwargs: Any) -> None:
        super().__init__(params, *args, **kwargs)
        self._offload_setup("adamw_8bit", slots, None)


def build_offloaded(
    params: Iterable[Any],
    name: str = "adamw_kahan",
    lr: float = 1e-5,
    betas: tuple[float, float] = (0.9, 0.95),
    weight_decay: float = 0.0,
    eps: float = 1e-8,
    slots: int = 2,
    **kwargs: Any,
) -> OffloadedKahanAdamW | OffloadedAdamW8bit:
    """``optim.build_optimizer`` with the state on the host (``adamw_kahan``, ``adamw_sr``, ``adamw_8bit``)."""
    _refuse(name)
    hyper = dict(lr=lr, betas=betas, weight_decay=weight_decay, eps=eps, slots=slots, **kwargs)
    if name == "adamw_8bit":
        return OffloadedAdamW8bit(params, **hyper)
    return OffloadedKahanAdamW(params, rounding="kahan" if name == "adamw_kahan" else "stochastic", **hyper)


def build_for(root, cfg, slots: int = 2):
    """``optim.build_for`` with the state on the host: ``(trainable params, optimizer)``."""

    def build(groups, name, **hyper):
        return build_offloaded(groups, name, slots=slots, **hyper)

    return optim.build_for(root, cfg, build=build)
