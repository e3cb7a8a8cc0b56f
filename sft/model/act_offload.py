"""Activation offloading: the tensors some transformer blocks save for backward wait in pinned host memory
instead of GPU memory, copied out on a side CUDA stream during forward and copied back (prefetched, a few
blocks ahead) during backward, so that larger micro-batches fit for the price of host-link traffic that runs
beside the compute.

Contracts:
- ``offload_blocks(model, blocks, min_bytes=MIN_BYTES, lead=None) -> list[int]``: the blocks (indices into
  :func:`sft.model.family.transformer_blocks`) whose saved tensors are offloaded; ``blocks`` an int ``n``
  means the *first* ``n`` blocks (``0..n-1``), a list the given indices. The first blocks are the right
  ones: their forward comes first, so their copies out overlap the forward of every later block, and their
  backward comes last, so their copies back overlap the backward of every later block (the last block's
  tensors are needed the moment backward starts: nothing could hide their copy back). Re-applying replaces
  the set (idempotent); ``offload_blocks(model, [])`` or :func:`clear` turns it off. ConfigError (one line)
  for a count or index that is not a whole number in range, a duplicate, or ``min_bytes`` / ``lead`` < 0.
  Returns the sorted indices.
  Each block's class is swapped for a subclass (made once per class, as FSDP2's ``fully_shard`` does) whose
  ``__call__`` enters ``torch.autograd.graph.saved_tensors_hooks`` *outside* ``Module.__call__``: outside a
  compiled block (``block.compile()`` compiles ``_call_impl``; the compiled autograd function's saved tensors
  reach the hooks at run time) and outside transformers' checkpoint (it wraps ``forward``), so a
  checkpointed (or selective) block offloads only what its checkpoint lets out to autograd: compiled, what the
  partitioner saves (a selective block: exactly :func:`kept_elements`); eager, a selective block's cached
  matmul outputs live in its checkpoint's cache, outside autograd, and stay on the GPU (only its input goes).
  A block called while other saved-tensor hooks are active (a checkpoint *around* the block, as our MPT
  recomputes a block whole, in forward and in its recomputation; ``save_on_cpu``; a dynamo trace) is not
  offloaded: the outer hooks stay in charge, so composing with ``torch.utils.checkpoint`` never changes a
  number.
- What is offloaded: each saved tensor of an offloaded block that is a plain strided tensor of at least
  ``min_bytes`` (default 1 MiB); not a parameter or buffer, nor a view of one (by storage data pointer, read
  at the block's call, so FSDP2's unsharded parameters count), nor a leaf that requires grad, nor an input
  of the block that needs no gradient (an attention mask, RoPE's cos / sin, MPT's ALiBi bias: every block's,
  alive on the GPU for the others anyway; ``stats().skipped_shared``; so is block 0's hidden-state input
  when the embedding is frozen, as under LoRA: one element of d per token that stays). Tensor subclasses
  (FP8 training tensors, DTensors) stay on the GPU. What is copied is the tensor's whole *storage*, once per
  block call however many views of it are saved (transformers' q/k/v projections each save a view of the
  same normed input; ``unbind`` saves q, k, v as views of one buffer), so the views come back as views of
  one copy and nothing is duplicated on either side (a storage is known by its weakref: one freed and
  reallocated at the same address within the call is a new one). Everything else is returned to autograd
  untouched.
- Pack (CUDA): the offload stream waits on the current stream, ``copy_(non_blocking=True)`` of the storage
  into pinned ``torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)``, records an event;
  ``record_stream(offload)`` on the storage, so the allocator reuses its memory only once the copy is done
  (no reference is kept).
  Unpack: the storage prefetched: the current stream waits on its event, ``record_stream(current)``, the
  tensor is rebuilt over it (``set_``: dtype, size, stride, offset as saved); once every view saved of it was
  handed back the copy lives on in those views alone (the handle keeps the host copy, so ``retain_graph``
  works); not prefetched (``stats().missed``): its whole block is prefetched now and waited for.
  Prefetch: when the gradient of block ``k``'s output arrives (a tensor hook registered in forward), the
  copies back of offloaded block ``k - lead`` (the last block's hook also takes every offloaded block above
  ``L - 1 - lead``) are enqueued on the prefetch stream, after the copies out (their events). ``lead``
  None (the default, :func:`default_lead`) is ``min(n, L - 1 - n)`` for ``n`` blocks offloaded of ``L``:
  the link back is slower than a block's backward (Llama-3-8B: ~21 ms a block back against ~13 ms of its
  backward), so the copies back must start about as many blocks ahead as there are to fetch
  (:func:`schedule` models it); and with the first blocks offloaded, a copy back started when backward
  reaches block ``k`` adds no peak memory while ``n + lead <= L - 1``: the blocks back by then (at most
  ``n + lead - k``) are never more than those backward has freed above ``k`` (``L - 1 - k``).
  CPU tensors (the CPU tests): the "host" copy is a plain ``clone`` of the storage and unpack rebuilds the
  tensor over it: no streams; gradients are bit-identical with and without offload
  (tests/test_act_offload.py).
- Host memory: one micro-batch's offloaded storages at a time (a graph's copies die with it), from torch's
  caching pinned allocator, which rounds each buffer up to a power of two (up to 2x, ~1.4x on average) and
  keeps it for the next step.
- ``offloaded_blocks(model) -> list[int]``; ``clear(model)``: the blocks get their classes back.
- ``stats(model) -> OffloadStats``: counters since the last ``reset_stats(model)`` (storages and bytes
  packed, tensors unpacked, storages prefetched, misses, tensors skipped as small / parameter / shared input,
  the storages packed per block).
- ``offloaded_elements(shape, mode="none", compiled=True) -> float``: elements of ``d`` per token (bf16)
  that leave the GPU per offloaded block: what the block keeps for backward
  (:func:`sft.model.recompute.kept_elements`; the 1 MiB floor drops only tensors too small to matter at a
  GPU-sized micro-batch, e.g. a log-sum-exp under 1 MiB). ``full`` is 0: the plan should not offload a
  block it recomputes whole (our MPT's is not offloaded at all: the checkpoint is around the block;
  transformers' moves the block input its checkpoint saves, 1). On the CPU tests (tiny models, SDPA,
  compiled) an offloaded block packs exactly :func:`kept_elements` in ``selective``; in ``none`` also the
  per-block copies of the SDPA paths (the bf16 mask / ALiBi bias, GQA's repeated k and v), which
  FlexAttention on the GPU does not make.
  ``offloaded_bytes(shape, tokens, n_blocks, mode="none", compiled=True)``: the bytes that go each way.
- ``offload_seconds(nbytes) -> Transfer(to_host, to_gpu)``: seconds over the host link each way at the
  bandwidths measured on the H100 machine (42.8 GiB/s to the host, 49.9 GiB/s to the GPU, pinned): an
  estimate, not a measurement of an offloaded step; how much of it hides behind compute depends on the
  blocks' forward and backward times (``to_host`` behind the forward of the blocks after the offloaded ones,
  ``to_gpu`` behind their backward).
- ``default_lead(n, n_blocks)``; ``schedule(n, n_blocks, block_bytes, forward_s, backward_s, lead=None) ->
  Schedule(forward_lag, in_flight, backward_stall)``: for the speed model and the plan, the first ``n``
  blocks offloaded on a model of the two links (an estimate): the seconds backward waits for copies back,
  and how many offloaded blocks are still on the GPU at the forward's end because their copies out lag.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import NamedTuple

import torch
from torch import nn

MIN_BYTES = 1 << 20  # smaller saved tensors stay on the GPU
GIB = 2**30
H2D_GIB_S = 49.9  # host -> H100, pinned, measured (sft/training/offload.py has the same numbers)
D2H_GIB_S = 42.8  # H100 -> host, pinned, measured


# --------------------------------------------------------------------------------------------- the plan
def offloaded_elements(shape, mode: str = "none", compiled: bool = True) -> float:
    """Elements of ``d`` per token (bf16) that leave the GPU per offloaded block (module docstring)."""
    from sft.model.recompute import kept_elements

    return 0.0 if mode == "full" else kept_elements(shape, mode, compiled)


def offloaded_bytes(shape, tokens: int, n_blocks: int, mode: str = "none", compiled: bool = True) -> int:
    """Bytes that go to the host (and come back) per micro-batch of ``tokens`` with ``n_blocks`` offloaded."""
    return int(n_blocks * tokens * shape.width * 2 * offloaded_elements(shape, mode, compiled))


class Transfer(NamedTuple):
    to_host: float
    to_gpu: float

    @property
    def total(self) -> float:
        return self.to_host + self.to_gpu


def offload_seconds(nbytes: float, d2h_gib_s: float = D2H_GIB_S, h2d_gib_s: float = H2D_GIB_S) -> Transfer:
    """Host-link seconds to move ``nbytes`` out (forward) and back (backward): an estimate from the measured
    bandwidths. Llama-3-8B, 4 x 2,048 tokens, one block (17.0 elements of d per token, compiled): 1.14 GB,
    25 ms out and 21 ms back."""
    return Transfer(nbytes / (d2h_gib_s * GIB), nbytes / (h2d_gib_s * GIB))


def default_lead(n: int, n_blocks: int) -> int:
    """How many blocks ahead the copies back start, ``n`` of ``n_blocks`` offloaded: ``min(n, L - 1 - n)``,
    at least 0 (module docstring)."""
    return max(0, min(n, n_blocks - 1 - n))


class Schedule(NamedTuple):
    forward_lag: float  # seconds the last copy out ends after the forward
    in_flight: int  # offloaded blocks whose copy out is not done when the forward ends (still on the GPU)
    backward_stall: float  # seconds backward waits for copies back


def schedule(
    n: int, n_blocks: int, block_bytes: float, forward_s: float, backward_s: float, lead: int | None = None
) -> Schedule:
    """What the first ``n`` of ``n_blocks`` blocks offloaded cost, by a model of one serial link each way:
    each block's forward takes ``forward_s`` and its backward ``backward_s`` (per block, the speed model's),
    each offloaded block moves ``block_bytes`` (:func:`offloaded_bytes` of one block) at the bandwidths of
    :func:`offload_seconds`; a block's copy out starts when its forward ends (its tensors are packed during
    it), its copy back when backward reaches the block ``lead`` above it (None: :func:`default_lead`) and not
    before its copy out ended; its backward waits for it. ``in_flight`` blocks are still on the GPU at the
    forward's end: the memory plan should count them as kept. Backward is taken to start as the forward ends
    (the head and loss time is slack the model does not count). An estimate: it ignores the copies' drag on
    the compute (memory bandwidth, copy engines).

    Llama-3-8B at 4 x 2,048 tokens (1.14 GB a block, 25 / 21 ms out / back; ~6.5 ms forward and ~13 ms
    backward a block on an H100, assumed): up to 8 blocks leave nothing in flight, and with the default
    lead (``n``) no stall; with ``lead = 2`` the link back (slower than a block's backward) stalls ~8 ms a
    block."""
    lead = default_lead(n, n_blocks) if lead is None else lead
    t = offload_seconds(block_bytes)
    end_forward = n_blocks * forward_s
    link, out_end = 0.0, {}
    for j in range(n):
        link = max(link, (j + 1) * forward_s) + t.to_host
        out_end[j] = link - end_forward  # on the backward's clock
    lag = max(0.0, link - end_forward)
    in_flight = sum(e > 0 for e in out_end.values())
    ready: dict[int, float] = {}
    clock = link_back = stall = 0.0

    def fetch(j: int) -> None:
        nonlocal link_back
        link_back = max(link_back, clock, out_end[j]) + t.to_gpu
        ready[j] = link_back

    for j in sorted((j for j in range(n) if j + lead >= n_blocks - 1), reverse=True):
        fetch(j)
    for k in range(n_blocks - 1, -1, -1):
        if 0 <= k - lead < n and k - lead not in ready:
            fetch(k - lead)
        if k in ready and ready[k] > clock:
            stall += ready[k] - clock
            clock = ready[k]
        clock += backward_s
    return Schedule(lag, in_flight, stall)


# --------------------------------------------------------------------------------------------- the stats
@dataclasses.dataclass
class OffloadStats:
    packed: int = 0  # storages copied to the host
    packed_bytes: int = 0  # their bytes
    unpacked: int = 0  # tensors handed back to autograd (views of the copies)
    prefetched: int = 0  # storages copied back to the GPU
    missed: int = 0  # unpacks that found their storage not on its way back (their block was fetched then)
    skipped_small: int = 0
    skipped_params: int = 0
    skipped_shared: int = 0  # block inputs that need no gradient (masks, RoPE tables, a bias: every block's)
    storages: dict = dataclasses.field(default_factory=dict)  # block index -> set of storage pointers packed


# --------------------------------------------------------------------------------------------- the hooks
class _Stored:
    """One storage copied to the host: the copy (uint8), the link that copies it (None: a CPU clone), the
    event of the copy out, a prefetched device copy and its event, the number of its views not yet handed
    back in this backward."""

    __slots__ = ("host", "device", "link", "out_event", "gpu", "in_event", "views", "pending", "__weakref__")

    def __init__(self, host, device, link, out_event):
        self.host, self.device, self.link, self.out_event = host, device, link, out_event
        self.gpu = self.in_event = None
        self.views = self.pending = 0


class _CudaLink:
    """The copies over the host link of one CUDA device, on two side streams (out, back)."""

    def __init__(self, device):
        self.out, self.back = torch.cuda.Stream(device), torch.cuda.Stream(device)
        self.device = device

    def copy_out(self, src: torch.Tensor):
        """``src`` (uint8 over a whole storage) to pinned host memory, after the current stream's work;
        ``src``'s memory is reused only once the copy is done. -> (host, event)."""
        self.out.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.out):
            host = torch.empty(src.numel(), dtype=torch.uint8, pin_memory=True)
            host.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.out)
        src.record_stream(self.out)
        return host, event

    def copy_back(self, host: torch.Tensor, out_event):
        """``host`` to the device on the back stream once its copy out is done. -> (device copy, event)."""
        self.back.wait_event(out_event)
        with torch.cuda.stream(self.back):
            gpu = host.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.back)
        return gpu, event

    def hand_over(self, gpu: torch.Tensor, in_event) -> None:
        """The current stream waits for the copy back, and the allocator for the current stream's use."""
        current = torch.cuda.current_stream(self.device)
        current.wait_event(in_event)
        gpu.record_stream(current)


class _StagedCpuLink:
    """For CPU tests of the prefetch logic: the CUDA link's steps as plain copies (``copy_back`` makes a new
    tensor, so a tensor handed back is never the host copy), events as strings."""

    def copy_out(self, src):
        return src.clone(), "out"

    def copy_back(self, host, out_event):
        assert out_event == "out"
        return host.clone(), "back"

    def hand_over(self, gpu, in_event) -> None:
        assert in_event == "back"


class _Handle:
    """What autograd keeps for one offloaded tensor: its storage's copy and where in it the tensor lies."""

    __slots__ = ("stored", "group", "dtype", "size", "stride", "offset")

    def __init__(self, stored: _Stored, group, t: torch.Tensor):
        self.stored, self.group = stored, group
        self.dtype, self.size, self.stride, self.offset = t.dtype, t.size(), t.stride(), t.storage_offset()

    def view(self, storage_tensor: torch.Tensor) -> torch.Tensor:
        out = torch.empty(0, dtype=self.dtype, device=storage_tensor.device)
        return out.set_(storage_tensor.untyped_storage(), self.offset, self.size, self.stride)


class _Group:
    """What one call of one offloaded block copied out (weakly: autograd owns the handles)."""

    __slots__ = ("index", "stored", "seen", "param_ptrs", "shared", "_block", "__weakref__")

    def __init__(self, index: int, block: nn.Module, shared: set[int]):
        self.index, self.shared = index, shared
        self.stored: list[weakref.ref] = []
        self.seen: dict[int, tuple[weakref.ref, _Stored]] = {}  # storage pointer -> (its weakref, copy)
        self.param_ptrs = None  # storages of the block's parameters and buffers, read at the first pack
        self._block = weakref.ref(block)

    def live(self) -> list[_Stored]:
        return [x for x in (r() for r in self.stored) if x is not None]


class _Controller:
    """Per model: which blocks offload, the streams, the stats, the groups of the last forward."""

    def __init__(self, n_blocks: int, offloaded: set[int], min_bytes: int, lead: int):
        self.n_blocks, self.offloaded, self.min_bytes, self.lead = n_blocks, offloaded, min_bytes, lead
        self.stats = OffloadStats()
        self.current: dict[int, weakref.ref] = {}  # block index -> its group of the latest forward
        self._links: dict = {}
        self.cpu_link = None  # tests: a _StagedCpuLink runs CPU tensors through the staged path

    def link(self, device):
        """The link of ``device``: a :class:`_CudaLink` (made once), ``cpu_link`` for the CPU."""
        if device.type == "cpu":
            return self.cpu_link
        if device not in self._links:
            self._links[device] = _CudaLink(device)
        return self._links[device]

    # ---- pack / unpack
    def pack(self, group: _Group, t: torch.Tensor):
        st = self.stats
        if type(t) is not torch.Tensor or t.layout != torch.strided or t.device.type not in ("cuda", "cpu"):
            return t
        if t.numel() * t.element_size() < max(self.min_bytes, 1):
            st.skipped_small += 1
            return t
        if group.param_ptrs is None:
            block = group._block()
            mods = [] if block is None else [*block.parameters(), *block.buffers()]
            group.param_ptrs = {p.untyped_storage().data_ptr() for p in mods if p.device.type != "meta"}
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if isinstance(t, nn.Parameter) or ptr in group.param_ptrs or (t.is_leaf and t.requires_grad):
            st.skipped_params += 1
            return t
        if ptr in group.shared:
            st.skipped_shared += 1
            return t
        hit = group.seen.get(ptr)
        if hit is not None and hit[0]() is storage:  # another view of a storage already copied
            stored = hit[1]
        else:
            src = torch.empty(0, dtype=torch.uint8, device=t.device).set_(storage)
            link = self.link(t.device)
            if link is None:  # CPU: a plain copy
                stored = _Stored(src.clone(), t.device, None, None)
            else:
                host, event = link.copy_out(src)
                stored = _Stored(host, t.device, link, event)
            del src
            group.stored.append(weakref.ref(stored))
            group.seen[ptr] = (weakref.ref(storage), stored)
            st.packed += 1
            st.packed_bytes += storage.nbytes()
            st.storages.setdefault(group.index, set()).add(ptr)
        stored.views += 1
        stored.pending += 1
        return _Handle(stored, group, t)

    def unpack(self, h):
        if not isinstance(h, _Handle):
            return h
        self.stats.unpacked += 1
        x = h.stored
        if x.link is None:  # CPU
            return h.view(x.host)
        if x.gpu is None:
            self.stats.missed += 1
            self.prefetch(h.group)
        gpu = x.gpu
        x.link.hand_over(gpu, x.in_event)
        x.pending -= 1
        if x.pending <= 0:  # every view handed back: the device copy lives on in them alone
            x.gpu = x.in_event = None
            x.pending = x.views
        return h.view(gpu)

    def prefetch(self, group: _Group | None) -> None:
        """Enqueue the copies back of ``group``'s storages not yet on the device (CPU clones need none)."""
        if group is None:
            return
        for x in group.live():
            if x.link is None or x.gpu is not None:
                continue
            x.gpu, x.in_event = x.link.copy_back(x.host, x.out_event)
            self.stats.prefetched += 1

    # ---- the block call
    def targets(self, index: int) -> list[int]:
        """Offloaded blocks whose copies back start when backward reaches block ``index``."""
        last = self.n_blocks - 1
        hit = (
            j for j in self.offloaded if j == index - self.lead or (index == last and j > last - self.lead)
        )
        return sorted(hit, reverse=True)

    def call(self, block, index: int, call, args, kwargs):
        grad = torch.is_grad_enabled()
        free = (
            grad
            and not torch.compiler.is_compiling()
            and torch._C._autograd._saved_tensors_hooks_is_enabled()
            and torch._C._autograd._top_saved_tensors_default_hooks(False) is None
        )
        if free and index in self.offloaded:
            shared = {
                t.untyped_storage().data_ptr()
                for t in torch.utils._pytree.tree_leaves((args, kwargs))
                if type(t) is torch.Tensor and not t.requires_grad and t.layout == torch.strided
            }
            group = _Group(index, block, shared)
            self.current[index] = weakref.ref(group)

            def pack_hook(t, group=group):
                return self.pack(group, t)

            with torch.autograd.graph.saved_tensors_hooks(pack_hook, self._unpack_hook()):
                out = call(*args, **kwargs)
        else:
            out = call(*args, **kwargs)
        if grad and not torch.compiler.is_compiling():
            groups = [self.current.get(j) for j in self.targets(index)]
            groups = [g for g in groups if g is not None and g() is not None]
            first = next(
                (t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)), None
            )
            if groups and first is not None and first.requires_grad:
                me = weakref.ref(self)

                def on_grad(_grad, groups=groups):
                    ctl = me()
                    if ctl is not None:
                        for g in groups:
                            ctl.prefetch(g())

                first.register_hook(on_grad)
        return out

    def _unpack_hook(self):
        me = weakref.ref(self)

        def unpack_hook(h):
            ctl = me()
            if ctl is None:  # the controller went away (clear) while a graph still held handles
                return _orphan(h)
            return ctl.unpack(h)

        return unpack_hook


def _orphan(h):
    """Unpack without a controller (``clear`` ran between forward and backward)."""
    if not isinstance(h, _Handle):
        return h
    x = h.stored
    if x.link is None:
        return h.view(x.host)
    gpu, event = x.link.copy_back(x.host, x.out_event)
    x.link.hand_over(gpu, event)
    return h.view(gpu)


class _OffloadingBlock:
    """Mixin of the swapped block classes: ``__call__`` runs the controller around ``Module.__call__``."""

    _act_offload: tuple | None = None  # (controller, index)

    def __call__(self, *args, **kwargs):
        state = self._act_offload
        if state is None:
            return super().__call__(*args, **kwargs)
        ctl, index = state
        return ctl.call(self, index, super().__call__, args, kwargs)


_CLASSES: dict[type, type] = {}


def _offloading_class(cls: type) -> type:
    if issubclass(cls, _OffloadingBlock):
        return cls
    if cls not in _CLASSES:
        _CLASSES[cls] = type(
            f"Offload{cls.__name__}", (_OffloadingBlock, cls), {"__module__": cls.__module__}
        )
    return _CLASSES[cls]


# --------------------------------------------------------------------------------------------- the API
def _indices(blocks, n: int) -> list[int]:
    from sft.config import ConfigError

    def whole(x):
        return isinstance(x, int) and not isinstance(x, bool)

    if whole(blocks):
        if not 0 <= blocks <= n:
            raise ConfigError(f"offload_blocks: {blocks} blocks; expected 0..{n} (the model has {n})")
        return list(range(blocks))
    try:
        items = list(blocks)
    except TypeError:
        raise ConfigError(
            f"offload_blocks: {blocks!r}; expected a block count or a list of indices"
        ) from None
    for i in items:
        if not whole(i) or not 0 <= i < n:
            raise ConfigError(f"offload_blocks: block {i!r}; expected an index in 0..{n - 1}")
    if len(set(items)) != len(items):
        raise ConfigError(f"offload_blocks: {items} names a block twice")
    return sorted(items)


def offload_blocks(
    model: nn.Module, blocks, min_bytes: int = MIN_BYTES, lead: int | None = None
) -> list[int]:
    """Offload the saved tensors of ``blocks`` (an int n: the first n) to pinned host memory (module
    docstring); returns the sorted indices."""
    from sft.config import ConfigError
    from sft.model.family import transformer_blocks

    mods = transformer_blocks(model)
    idx = _indices(blocks, len(mods))
    for name, v in (("min_bytes", min_bytes), ("lead", 0 if lead is None else lead)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ConfigError(f"offload_blocks: {name}={v!r}; expected a whole number >= 0")
    clear(model)
    if not idx:
        return []
    ctl = _Controller(
        len(mods), set(idx), min_bytes, default_lead(len(idx), len(mods)) if lead is None else lead
    )
    for i, block in enumerate(mods):
        block.__class__ = _offloading_class(type(block))
        block._act_offload = (ctl, i)
    return idx


def _controller(model) -> _Controller | None:
    from sft.model.family import transformer_blocks

    for block in transformer_blocks(model):
        state = getattr(block, "_act_offload", None)
        if state is not None:
            return state[0]
    return None


def offloaded_blocks(model) -> list[int]:
    ctl = _controller(model)
    return sorted(ctl.offloaded) if ctl else []


def stats(model) -> OffloadStats:
    ctl = _controller(model)
    return ctl.stats if ctl else OffloadStats()


def reset_stats(model) -> None:
    ctl = _controller(model)
    if ctl:
        ctl.stats = OffloadStats()


def clear(model) -> None:
    """No block offloads; each gets its class back (a class FSDP2 derived from ours keeps it, inert)."""
    from sft.model.family import transformer_blocks

    for block in transformer_blocks(model):
        if isinstance(block, _OffloadingBlock):
            block._act_offload = None
            if type(block) in _CLASSES.values():
                block.__class__ = type(block).__mro__[2]
            if "_act_offload" in block.__dict__:
                del block.__dict__["_act_offload"]
