"""FP8 training of the transformer blocks' linear layers (``--fp8``), through torchao's float8 training.

Contracts:
- ``--fp8=none|tensorwise|rowwise`` (:data:`RECIPES`): torchao's recipe of that name
  (``Float8LinearConfig.from_recipe_name``). ``tensorwise``: one dynamic scale per tensor, e4m3 inputs and
  weights, e5m2 output gradients, cuBLAS FP8 GEMMs. ``rowwise``: one scale per row (power of 2), e4m3
  everywhere, CUTLASS row-wise GEMMs; slower, closer to bf16.
- Only the ``nn.Linear`` layers inside the transformer blocks (:func:`sft.model.family.transformer_blocks`)
  are converted: never the embedding nor the LM head (the logits and the loss stay in bf16/fp32).
  The converted layers are ``Float8Linear``, an ``nn.Linear`` subclass holding the same high-precision
  ``weight`` parameter: state dicts, checkpoints, ``final/`` and the optimizer see the same tensors as
  without FP8; only the matmuls run in FP8 (weights and activations are cast, with fresh scales, at
  every call).
- :func:`check_fp8` refuses, in one ConfigError line and before the run folder: LoRA/QLoRA (their
  adapters and NF4 base are other linear types), a device that is not CUDA, a GPU of compute capability
  below 8.9 (no FP8 tensor cores), torchao not installed, a block linear whose in/out features are not
  multiples of 16 (FP8 GEMMs cannot take it; the layer is named).
- :func:`convert_blocks` swaps the layers in place and returns how many; :func:`sft.training.engine.setup_model`
  calls it before checkpointing and the per-block compile (the compiled block then fuses the casts), and
  before FSDP2 sharding. ``enable_fsdp_float8_all_gather`` stays False: FSDP2 all-gathers the
  high-precision (bf16) weights and each layer casts them to FP8 itself. The FP8 all-gather only halves
  the all-gather volume (it matters across nodes, not on one NVLink host), works only for tensorwise,
  needs ``precompute_float8_dynamic_scale_for_fsdp`` after each optimizer step, and turns every weight
  into a tensor subclass that our checkpoints and consolidated export would have to learn.
- MFU stays computed against the bf16 dense peak (:mod:`sft.training.flops`): an FP8 run's MFU is comparable with
  a bf16 run's, and tokens/s is the headline.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

from sft.config import ConfigError
from sft.model.family import transformer_blocks

log = logging.getLogger("sft")

RECIPES = ("tensorwise", "rowwise")
MIN_CAPABILITY = (8, 9)  # Ada (sm_89) and Hopper (sm_90) have FP8 tensor cores
FP8_MULTIPLE = 16  # torch._scaled_mm: both dimensions of the weight multiples of 16
INSTALL = "pip install torchao==0.18.0 (the pinned version; FP8 training is pure Python, its CUDA extensions optional)"


def block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """``{qualified name: layer}`` of every ``nn.Linear`` inside the transformer blocks of ``model``."""
    inside = {id(m) for block in transformer_blocks(model) for m in block.modules()}
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and id(m) in inside}


def block_linear_filter(model: nn.Module):
    """torchao's ``module_filter_fn(module, fqn) -> bool``: True exactly for the block linears of ``model``."""
    chosen = {id(m) for m in block_linears(model).values()}
    return lambda module, fqn: id(module) in chosen


def check_fp8(model: nn.Module, recipe: str, device: torch.device, adapters: bool = False) -> None:
    """Refuse ``--fp8=recipe`` where it cannot run (module docstring); nothing for ``none``. ``adapters``:
    the run trains LoRA / QLoRA adapters (``--lora`` / ``--qlora``)."""
    if recipe == "none":
        return
    opt = f"--fp8={recipe}"
    if adapters:
        raise ConfigError(
            f"{opt} converts the full-weight linears: not with --lora/--qlora (train one or the other)"
        )
    if device.type != "cuda":
        raise ConfigError(
            f"{opt} needs a CUDA GPU with FP8 tensor cores (compute capability >= 8.9: L4, L40S, RTX 4090, "
            f"H100, H200 ...); this run is on {device.type} (use --fp8=none)"
        )
    cap = torch.cuda.get_device_capability(device)
    if tuple(cap) < MIN_CAPABILITY:
        raise ConfigError(
            f"{opt}: {torch.cuda.get_device_name(device)} has compute capability {cap[0]}.{cap[1]}, FP8 tensor "
            "cores need >= 8.9 (Ada, Hopper and later); use --fp8=none"
        )
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        raise ConfigError(f"{opt} needs the torchao package: {INSTALL}") from None
    for name, layer in block_linears(model).items():
        if layer.in_features % FP8_MULTIPLE or layer.out_features % FP8_MULTIPLE:
            raise ConfigError(
                f"{opt}: {name} has in_features={layer.in_features}, out_features={layer.out_features}; FP8 "
                f"GEMMs need both multiples of {FP8_MULTIPLE} (use --fp8=none for this model)"
            )


def float8_config(recipe: str, emulate: bool = False):
    """torchao's ``Float8LinearConfig`` of ``recipe``; ``emulate`` computes the GEMMs in fp32 from the FP8
    values (any device: the CPU tests), ``enable_fsdp_float8_all_gather`` False (module docstring)."""
    from torchao.float8 import Float8LinearConfig

    if recipe not in RECIPES:
        raise ConfigError(f"--fp8={recipe}: expected one of none, {', '.join(RECIPES)}")
    config = Float8LinearConfig.from_recipe_name(recipe)
    return dataclasses.replace(config, emulate=emulate, enable_fsdp_float8_all_gather=False)


def convert_blocks(model: nn.Module, recipe: str, emulate: bool = False) -> int:
    """Swap the block linears of ``model`` for torchao ``Float8Linear`` (in place); return how many.
    ``recipe='none'`` converts nothing."""
    if recipe == "none":
        return 0
    from torchao.float8 import convert_to_float8_training

    n = len(block_linears(model))
    convert_to_float8_training(
        model, config=float8_config(recipe, emulate), module_filter_fn=block_linear_filter(model)
    )
    log.info("fp8: %d linear layers of the transformer blocks train in FP8 (%s scaling)", n, recipe)
    return n
