"""Several GPUs (or CPU processes) under ``torchrun``: PyTorch's own FSDP2, nothing home-made.

Contract:
- :func:`init` reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
  ``MASTER_PORT``) and starts the default process group: NCCL on CUDA (each process on
  ``cuda:LOCAL_RANK``), gloo on CPU. Without torchrun (``--distributed`` alone) it makes a group of one.
- :class:`LossModule` is the root of the sharded tree: ``forward(input_ids, targets, document_ids,
  position_ids)`` (all ``[B, T]``, see CONTRACTS.md "Batch") returns the 0-d fp32 **sum** of cross-entropy
  over the targets ``!= IGNORE_INDEX``. The LM head product happens inside the root's forward, so FSDP's
  hooks have gathered the embedding / head / final norm when they are used.
- :func:`shard_model` applies ``fully_shard`` to every transformer block (Llama ``model.layers``, HF MPT
  and our MPT ``transformer.blocks``, or ``blocks``), then to the root. Activation checkpointing must be
  switched on before (it wraps the block calls; FSDP's hooks sit on the blocks themselves).
  Parameters, gradients and optimizer state are then sharded on dim 0 across the ranks (DTensors).
- Gradients: FSDP's reduce-scatter *averages* over the W ranks. The trainer backpropagates
  ``W * sum CE_local / N_global`` so the average is ``sum over ranks of CE / N_global``: the gradient of
  the step loss of CONTRACTS.md "Loss" (exact: W is a power of two in practice, and the scale is applied
  to a scalar). :func:`all_reduce_sum` sums counts (N, tokens) over ranks.
- Checkpoints (:func:`save_checkpoint` / :func:`load_checkpoint`): ``checkpoints/step_XXXXXXX/`` holds
  ``dcp/`` (``torch.distributed.checkpoint``: model + optimizer, each rank writes its own shards),
  ``rng_rank{r}.pt``, ``config.json`` and ``state.json`` (written last, with ``world_size``), renamed
  into place by rank 0 after every rank has finished. Resumable at the same world size only.
- Ending: :func:`leave_together` (after a run that ended without an error) holds every rank until rank 0 has
  written what only it writes (samples, ``final/``, GGUF), on a gloo group made at :func:`init` with a day's
  timeout; then :func:`destroy`. A rank that tore its group down and exited while rank 0 was still working
  aborted under torchrun ("terminate called without an active exception", seen in CI on CPU).
- :func:`consolidated_model`: the full state dict gathered to rank 0 on CPU, loaded into a fresh,
  unsharded copy of the model there (``None`` on other ranks): used for the samples and ``final/``.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from sft.model.family import transformer_blocks
from sft.model.loss import chunked_cross_entropy_sum
from sft.model.models import forward_hidden
from sft.training.checkpoints import dcp_checkpoint_problem  # noqa: F401  (re-exported: the sharded-checkpoint check)
from sft.training.runs import RunError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``enabled`` False means the plain single-process path."""

    enabled: bool = False
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def wanted(cfg) -> bool:
    """True under ``torchrun`` with more than one process, or when ``cfg.distributed`` asks for FSDP."""
    return int(os.environ.get("WORLD_SIZE") or 1) > 1 or bool(getattr(cfg, "distributed", False))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(device_type: str) -> DistInfo:
    """Start (or join) the default process group; returns this process's :class:`DistInfo`.

    ``device_type``: ``"cuda"`` (NCCL, ``torch.cuda.set_device(LOCAL_RANK)``) or ``"cpu"`` (gloo).
    """
    if not os.environ.get("MASTER_ADDR"):  # --distributed without torchrun: a group of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ["MASTER_PORT"] = str(_free_port())
    rank, world = int(os.environ.get("RANK") or 0), int(os.environ.get("WORLD_SIZE") or 1)
    local_rank = int(os.environ.get("LOCAL_RANK") or 0)
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    global _ENDING
    _ENDING = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=1))
    return DistInfo(True, rank, world, local_rank)


_ENDING = None  # the gloo group of leave_together (made by init)


def leave_together(info: DistInfo) -> None:
    """Wait here until every rank is here (rank 0 comes last: it writes the run's end alone)."""
    if info.enabled and _ENDING is not None:
        dist.barrier(group=_ENDING)


def destroy() -> None:
    global _ENDING
    _ENDING = None
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def _comm_device() -> torch.device:
    # NCCL reduces CUDA tensors only; gloo CPU ones
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(x, info: DistInfo | None = None):
    """Sum of ``x`` (a number, a list of numbers or a tensor) over all ranks; ``x`` itself when not distributed.

    Numbers come back as the same Python type (summed in int64 / float64: token counts stay exact)."""
    if info is not None and not info.enabled or not dist.is_initialized():
        return x
    if isinstance(x, torch.Tensor):
        y = x.detach().to(_comm_device(), copy=True)
        dist.all_reduce(y)
        return y.to(x.device)
    if isinstance(x, list | tuple):
        t = torch.tensor([float(v) for v in x], dtype=torch.float64, device=_comm_device())
        dist.all_reduce(t)
        return [type(v)(r) for v, r in zip(x, t.tolist(), strict=True)]
    t = torch.tensor(x, dtype=torch.int64 if isinstance(x, int) else torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return type(x)(t.item())


def all_reduce_max(x: float, info: DistInfo) -> float:
    """Maximum of ``x`` over all ranks (peak memory, stop flags); ``x`` when not distributed."""
    if not info.enabled:
        return x
    t = torch.tensor(float(x), dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def broadcast_object(obj, info: DistInfo):
    """Rank 0's ``obj`` on every rank (a run folder name, a resume path)."""
    if not info.enabled:
        return obj
    box = [obj if info.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ----------------------------------------------------------------------------- sharding


class LossModule(nn.Module):
    """Root of the FSDP tree: the model and its chunked cross-entropy in one forward.

    ``forward(input_ids, targets, document_ids, position_ids)`` -> 0-d fp32 sum of CE over supervised
    targets (the numerator of the step loss). State-dict keys are the model's, prefixed ``model.``.
    """

    def __init__(self, model: nn.Module, loss_chunk: int = 1024):
        super().__init__()
        self.model = model
        self.loss_chunk = loss_chunk

    @property
    def inner_model(self) -> nn.Module:
        """The wrapped model (sft.model.family.transformer_blocks finds its blocks through this)."""
        return self.model

    def forward(self, input_ids, targets, document_ids, position_ids) -> torch.Tensor:
        batch = {"input_ids": input_ids, "document_ids": document_ids, "position_ids": position_ids}
        h, w = forward_hidden(self.model, batch)
        return chunked_cross_entropy_sum(h, w, targets, self.loss_chunk)


def mixed_precision(device: torch.device, precision: str):
    """FSDP2 policy: bf16 compute, fp32 gradient reduce on CUDA (unless ``precision='fp32'``); on CPU
    parameters keep their dtype (fp32), so CPU runs compare exactly with single-process ones.

    ``cast_forward_inputs=False``: the blocks receive the ALiBi slopes / masks inside a dict, and the
    default cast would round those to bf16; activations are bf16 anyway once the embedding is.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if device.type == "cuda" and precision != "fp32":
        return MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False
        )
    return MixedPrecisionPolicy(cast_forward_inputs=False)


def shard_model(model: nn.Module, mp_policy=None, *, device_type: str = "cpu", reshard_after_forward=True):
    """``fully_shard`` each transformer block, then the root ``model``; returns ``model`` (now an FSDPModule).

    Call after ``model.to(device)`` and after enabling activation checkpointing, before building the
    optimizer (parameters become DTensors). ``reshard_after_forward=True`` frees each block's gathered
    parameters after its forward (ZeRO-3); the root keeps its own (needed first in backward).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    mp_policy = mp_policy or MixedPrecisionPolicy()
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy)
    return model


def full_tensor(x):
    """A plain tensor from a DTensor (e.g. the total grad norm of sharded gradients)."""
    return x.full_tensor() if hasattr(x, "full_tensor") else x


# ----------------------------------------------------------------------------- checkpoints (DCP)


def save_checkpoint(
    run_dir: Path, step: int, *, model, optimizer, state: dict, cfg_dict: dict, keep_last: int, info: DistInfo
) -> Path:
    """Collective: every rank writes its shards of model + optimizer to ``checkpoints/step_{step:07d}/dcp``.

    Written into a temporary folder that rank 0 renames after all ranks are done, so a ``step_*`` folder
    is always complete (``state.json`` last). Keeps the newest ``keep_last``. Returns the folder.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from sft.training import checkpoints, runs

    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp_step_{step:07d}"  # same name on every rank
    if info.is_main:
        root.mkdir(exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier(info)
    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=str(tmp / "dcp"))
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, tmp / f"rng_rank{info.rank}.pt")
    barrier(info)
    if info.is_main:
        runs._write_json(tmp / "config.json", cfg_dict)
        runs._write_json(tmp / "state.json", {**state, "world_size": info.world, "format": "dcp"})
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in checkpoints.list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(info)
    return final


def is_dcp_checkpoint(ckpt: Path) -> bool:
    return (Path(ckpt) / "dcp").is_dir()


def checkpoint_world_size(ckpt: Path) -> int:
    return int(json.loads((Path(ckpt) / "state.json").read_text()).get("world_size", 1))


def load_checkpoint(ckpt: Path, *, model, optimizer, info: DistInfo) -> dict:
    """Collective: restore the sharded model + optimizer and this rank's RNG; return ``state.json``
    (without ``world_size``/``format``). RunError when the world size differs from the one that saved it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from sft.training.runs import RunError

    state = json.loads((Path(ckpt) / "state.json").read_text())
    saved_world = int(state.pop("world_size", 1))
    state.pop("format", None)
    if saved_world != info.world:
        raise RunError(
            f"{ckpt} was written by {saved_world} processes; resume it with torchrun --nproc_per_node "
            f"{saved_world} (this run has {info.world})"
        )
    msd, osd = get_state_dict(model, optimizer)
    sd = {"model": msd, "optimizer": osd}
    dcp.load(sd, checkpoint_id=str(Path(ckpt) / "dcp"))
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optimizer"])
    rng = torch.load(Path(ckpt) / f"rng_rank{info.rank}.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return state


# ----------------------------------------------------------------------------- consolidated export


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """Collective: the full (unsharded) state dict on rank 0, on CPU; ``{}`` on other ranks.

    For a :class:`LossModule` root the ``model.`` prefix is removed (the keys are the model's own)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if isinstance(model, LossModule):
        sd = {k.removeprefix("model."): v for k, v in sd.items()}
    return sd


def consolidated_model(model, info: DistInfo) -> nn.Module | None:
    """Collective: on rank 0, a fresh unsharded CPU copy of ``model`` (a :class:`LossModule`'s inner model)
    with the trained weights; ``None`` elsewhere.

    The copy is built on the meta device (no random init: a 7B model would take minutes), materialised
    with ``to_empty``, then filled: parameters and persistent buffers from the gathered state dict,
    non-persistent buffers (rotary frequencies, ...) copied from the sharded model, where FSDP leaves
    buffers whole.
    """
    sd = full_state_dict(model)
    if not info.is_main:
        return None
    inner = model.model if isinstance(model, LossModule) else model
    kwargs = {"attn_impl": inner.attn_impl} if hasattr(inner, "attn_impl") else {}
    with torch.device("meta"):
        fresh = type(inner)(inner.config, **kwargs)
    fresh = fresh.to_empty(device="cpu")
    missing, unexpected = fresh.load_state_dict(sd, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")}
    if set(missing) - tied or unexpected:
        raise RuntimeError(
            f"consolidated state dict does not fit: missing {missing}, unexpected {unexpected}"
        )
    if tied and hasattr(fresh, "tie_weights"):
        fresh.tie_weights()
    buffers = dict(inner.named_buffers())
    with torch.no_grad():
        for name, buf in fresh.named_buffers():
            if name not in sd and name in buffers and buffers[name] is not None:
                buf.copy_(buffers[name].detach().to("cpu"))
    if hasattr(inner, "generation_config"):
        fresh.generation_config = inner.generation_config
    if hasattr(inner, "gradient_checkpointing"):
        fresh.gradient_checkpointing = False
    fresh.eval()
    return fresh


def check_resume_world(resume_from: Path, info: DistInfo) -> None:
    """RunError when ``resume_from`` was written by another number of processes than ``info.world``."""

    W = info.world
    if is_dcp_checkpoint(resume_from) != info.enabled or (
        info.enabled and checkpoint_world_size(resume_from) != W
    ):
        n = checkpoint_world_size(resume_from) if is_dcp_checkpoint(resume_from) else 1
        how = f"torchrun --nproc_per_node {n}" if n > 1 else "one process"
        raise RunError(
            f"{resume_from} was written by {n} process(es) and this run has {W}: resume it with {how}"
        )
