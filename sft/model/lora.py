"""LoRA through peft: inject adapters, train only them, checkpoint them, save them, merge and export.

Works on transformers causal LMs (Llama family, ``MptForCausalLM``, ...) and on our MPT
(``sft.model.mpt.MPTForCausalLM``, a plain ``nn.Module``). Adapters are injected in place with
``peft.inject_adapter_in_model``: the model keeps its class, so ``sft.model.models.forward_hidden``, our MPT's
``forward_hidden(input_ids, document_ids)`` / ``lm_head_weight``, ``compile_blocks``, gradient checkpointing
and ``fully_shard`` see the same model as before, with each targeted ``nn.Linear`` replaced by a
``peft.tuners.lora.Linear`` that holds the original layer as ``base_layer``. Attention masks and document
ids are untouched (LoRA changes weights, never the attention pattern), so packing works unchanged.

The adapted function: for a targeted ``W [out, in]``, ``y = x W^T + (alpha / rank) * dropout(x) A^T B^T``
with ``A [rank, in]`` (Kaiming-uniform init) and ``B [out, rank]`` (zero init), so a freshly adapted model
computes exactly what the base computes. Only ``A`` and ``B`` have ``requires_grad``; every base parameter
(embeddings, norms, the tied head included) is frozen.

Names (peft's, without the adapter name): ``lora_state_dict`` keys are the module path plus
``.lora_A.weight`` / ``.lora_B.weight``, e.g. ``transformer.blocks.0.attn.Wqkv.lora_A.weight`` for MPT
(both implementations: their module names are the same) and ``model.layers.0.self_attn.q_proj.lora_A.weight``
for Llama. ``save_adapter`` writes peft's on-disk format (``adapter_config.json`` +
``adapter_model.safetensors`` with keys prefixed ``base_model.model.``), which
``peft.PeftModel.from_pretrained(base, folder)`` loads; so an adapter trained on our MPT loads into
transformers' ``MptForCausalLM``.

QLoRA: :func:`quantize_nf4` (before ``apply_lora``) replaces the targeted base weights by torchao
``NF4Tensor``s (4-bit NormalFloat, QLoRA's format); peft's LoRA layers run on them unchanged, and
:func:`merge_lora` merges into the dequantized weights. Needs the ``torchao`` package (0.18.0 matches
torch 2.11; its NF4 code is pure Python).

Typical use (the trainer):

    model = apply_lora(model, rank=16, alpha=32, dropout=0.05)     # before building the optimizer
    ... train; checkpoint with lora_state_dict(model) / load_lora_state_dict(model, sd) ...
    save_adapter(model, run_dir / "adapter")
    merge_lora(model)                 # in place: plain model again, merged weights
    runs.save_final(run_dir, model, tokenizer)   # or merge_and_export(model, tokenizer, out_dir)
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from sft.model.family import family, is_ours

log = logging.getLogger(__name__)

ADAPTER_NAME = "default"  # peft's default adapter name; stripped from saved keys
# Prefix PeftModel puts before module paths in adapter_model.safetensors (PeftModel.base_model.model...).
PEFT_PREFIX = "base_model.model."

_LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# All linear layers of the blocks (the QLoRA paper's finding: adapting every linear layer matters more
# than the rank); never the embedding or the (tied) output head.
LORA_DEFAULT_TARGETS: dict[str, list[str]] = {
    "mpt": ["Wqkv", "out_proj", "up_proj", "down_proj"],
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
}


def default_targets(model: nn.Module) -> list[str]:
    """Module-name suffixes LoRA adapts by default for this model (see ``LORA_DEFAULT_TARGETS``).

    Raises ValueError for an architecture not in the table: pass ``targets`` explicitly then.
    """
    kind = family(model).model_type  # "mpt" for our MPT too
    if kind not in LORA_DEFAULT_TARGETS:
        raise ValueError(
            f"no default LoRA target modules for model type {kind!r}; pass targets "
            f"(e.g. --lora_targets=q_proj,v_proj); known: {', '.join(sorted(LORA_DEFAULT_TARGETS))}"
        )
    return list(LORA_DEFAULT_TARGETS[kind])


def is_lora(model: nn.Module) -> bool:
    """True if ``model`` holds injected (unmerged) LoRA layers. ``peft_config`` is set by peft's injection and
    removed by :func:`merge_lora`: checking it first spares importing peft for every full fine-tuning save."""
    if getattr(model, "peft_config", None) is None:
        return False
    from peft.tuners.lora import LoraLayer

    return any(isinstance(m, LoraLayer) for m in model.modules())


def _embedding(model: nn.Module) -> nn.Module | None:
    if is_ours(model):
        return model.transformer.wte
    get = getattr(model, "get_input_embeddings", None)
    return get() if get is not None else None


def _make_output_require_grad(module, inputs, output):
    # Frozen embeddings give an output that does not require grad. Reentrant torch.utils.checkpoint
    # (and any checkpoint wrapper that checks its inputs) then skips the backward of the blocks it wraps,
    # so the adapters inside get no gradient at all. Marking the embedding output as requiring grad
    # fixes that for every checkpointing flavour, at the cost of one unused input-gradient in block 0.
    output.requires_grad_(True)


def apply_lora(
    model: nn.Module,
    *,
    rank: int = 16,
    alpha: float = 32,
    dropout: float = 0.05,
    targets: list[str] | None = None,
    adapter_dtype: torch.dtype | None = None,
    input_grads: bool = True,
) -> nn.Module:
    """Inject LoRA adapters into ``model`` in place and return it (same object, same class).

    - ``rank``/``alpha``/``dropout``: ``r``, ``lora_alpha``, ``lora_dropout`` of ``peft.LoraConfig``; the
      update is scaled by ``alpha / rank``.
    - ``targets``: module-name suffixes to adapt (``nn.Linear`` only); ``None`` = ``default_targets(model)``.
    - ``adapter_dtype``: dtype of A and B; ``None`` = the base weights' dtype (what FSDP2 wants: one dtype
      per sharded group). ``torch.float32`` over a bf16 base keeps the small adapter update exact with plain
      AdamW on one GPU.
    - ``input_grads``: make the input embedding's output require grad (needed for reentrant activation
      checkpointing with a frozen embedding; harmless otherwise).

    After the call every base parameter has ``requires_grad=False`` and only ``lora_A``/``lora_B`` weights
    are trainable; build the optimizer from ``[p for p in model.parameters() if p.requires_grad]`` afterwards.
    Raises ValueError if the model already has adapters, or a target matches no module.
    """
    from peft import LoraConfig, inject_adapter_in_model

    if is_lora(model):
        raise ValueError("model already has LoRA adapters")
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    if not 0 <= dropout < 1:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
    targets = list(targets) if targets else default_targets(model)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        bias="none",
        base_model_name_or_path=getattr(getattr(model, "config", None), "_name_or_path", None) or None,
    )
    # peft raises its own ValueError when no module matches any target.
    model = inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    for name, p in model.named_parameters():
        # peft already freezes the base; restating it keeps the contract independent of peft's defaults.
        p.requires_grad_(".lora_A." in name or ".lora_B." in name)
        if adapter_dtype is not None and p.requires_grad:
            p.data = p.data.to(adapter_dtype)
    if input_grads:
        emb = _embedding(model)
        if emb is not None and not getattr(model, "_lora_input_grads_hook", None):
            model._lora_input_grads_hook = emb.register_forward_hook(_make_output_require_grad)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    log.info(
        "LoRA r=%d alpha=%g dropout=%g on %s: %d trainable of %d parameters (%.3f%%)",
        rank, alpha, dropout, ",".join(targets), n_train, n_all, 100 * n_train / max(n_all, 1),
    )  # fmt: skip
    return model


def lora_config(model: nn.Module):
    """The ``peft.LoraConfig`` the model's adapters were injected with."""
    try:
        return model.peft_config[ADAPTER_NAME]
    except (AttributeError, KeyError):
        raise ValueError("model has no LoRA adapters (apply_lora first)") from None


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Adapter weights only, detached CPU copies, keyed as in peft (``<module>.lora_A.weight`` /
    ``<module>.lora_B.weight``, no adapter name). For checkpoints: the base is reloaded from its source."""
    from peft import get_peft_model_state_dict

    lora_config(model)
    sd = get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME, save_embedding_layers=False)
    return {k: v.detach().to("cpu").clone().contiguous() for k, v in sd.items()}


def load_lora_state_dict(model: nn.Module, sd: dict[str, Tensor]) -> None:
    """Copy adapter weights (as from ``lora_state_dict``) into a model with the same adapters, in place.

    Strict: raises ValueError if an adapter weight of the model is missing from ``sd`` or ``sd`` has a key
    the model lacks. Tensors are cast to each parameter's dtype and device.
    """
    from peft import set_peft_model_state_dict

    lora_config(model)
    expected = set(lora_state_dict(model))
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise ValueError(f"LoRA state dict mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
    result = set_peft_model_state_dict(model, sd, adapter_name=ADAPTER_NAME)
    bad = [k for k in result.unexpected_keys if "lora_" in k]
    if bad:  # defensive: peft reports keys it could not place
        raise ValueError(f"LoRA state dict: peft could not place {bad[:3]}")


def save_adapter(model: nn.Module, out_dir: str | os.PathLike) -> Path:
    """Write the adapter alone in peft's format: ``adapter_config.json`` + ``adapter_model.safetensors``
    (keys ``base_model.model.<module>.lora_{A,B}.weight``, the adapters' dtype). Returns ``out_dir``.
    ``peft.PeftModel.from_pretrained(base_model, out_dir)`` or :func:`load_adapter` reads it."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = lora_config(model)
    config.save_pretrained(str(out))
    sd = {PEFT_PREFIX + k: v for k, v in lora_state_dict(model).items()}
    save_file(sd, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike, *, input_grads: bool = True) -> nn.Module:
    """Inject the adapters described by ``adapter_dir/adapter_config.json`` into ``model`` (in place) and
    load their weights from ``adapter_model.safetensors``; returns the model, adapters trainable."""
    from safetensors.torch import load_file

    folder = Path(adapter_dir)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{folder}: not a LoRA adapter (peft_type={cfg.get('peft_type')!r})")
    targets = cfg["target_modules"]
    model = apply_lora(
        model,
        rank=cfg["r"],
        alpha=cfg["lora_alpha"],
        dropout=cfg.get("lora_dropout", 0.0),
        targets=sorted(targets) if isinstance(targets, list) else targets,
        input_grads=input_grads,
    )
    sd = load_file(str(folder / "adapter_model.safetensors"))
    load_lora_state_dict(model, {k.removeprefix(PEFT_PREFIX): v for k, v in sd.items()})
    return model


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (``W += (alpha / rank) * B @ A``, computed by peft in fp32
    on CPU for half dtypes) and put the plain base layers back, in place. Returns the same model, now
    without LoRA modules, its state dict named as before ``apply_lora``; base parameters stay frozen."""
    from peft.tuners.lora import LoraLayer

    lora_config(model)
    for name, module in list(model.named_modules()):
        if not isinstance(module, LoraLayer):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = module.get_base_layer()
        if hasattr(base.weight, "get_original_weight"):  # NF4 (QLoRA): merge into the dequantized weight
            base.weight = nn.Parameter(base.weight.get_original_weight(), requires_grad=False)
        module.merge(safe_merge=True)  # safe_merge: raises on a non-finite merged weight
        setattr(parent, child, module.get_base_layer())
    del model.peft_config
    hook = getattr(model, "_lora_input_grads_hook", None)
    if hook is not None:
        hook.remove()
        del model._lora_input_grads_hook
    if is_lora(model):  # nested LoRA layers would mean a half-merged model
        raise RuntimeError("LoRA layers left after merging")
    return model


def quantize_nf4(
    model: nn.Module,
    *,
    targets: list[str] | None = None,
    block_size: int = 64,
    scaler_block_size: int = 256,
) -> nn.Module:
    """QLoRA's frozen 4-bit base: replace the weight of every ``nn.Linear`` whose name ends with one of
    ``targets`` (default ``default_targets(model)``: the blocks' linear layers; never the embedding or
    head) by a torchao ``NF4Tensor`` (4-bit NormalFloat, one absmax scale per ``block_size`` values, the
    scales themselves quantized per ``scaler_block_size``), in place. Call before :func:`apply_lora`.

    ``F.linear`` on an NF4 weight dequantizes it to its original dtype (bf16 for QLoRA) and multiplies;
    gradients flow to the input only (the base is frozen). :func:`merge_lora` merges into the dequantized
    weight, so the exported model is bf16. Needs ``torchao`` (ImportError otherwise).
    """
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

    if is_lora(model):
        raise ValueError("quantize_nf4 must run before apply_lora")
    suffixes = tuple(targets) if targets else tuple(default_targets(model))
    n = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in suffixes:
            w = module.weight.detach()
            module.weight = nn.Parameter(to_nf4(w, block_size, scaler_block_size), requires_grad=False)
            n += 1
    if n == 0:
        raise ValueError(f"quantize_nf4: no nn.Linear named {suffixes}")
    log.info("NF4-quantized %d linear layers (block %d)", n, block_size)
    return model


def save_merged(model: nn.Module, out_dir: str | os.PathLike) -> Path:
    """Write an already merged (or never adapted) model as a transformers folder: our MPT through
    ``sft.model.mpt.save_hf`` (loads as ``transformers.MptForCausalLM``), transformers models through
    ``save_pretrained`` (a GGUF-loaded model, which refuses saving, is first rebuilt from its config)."""
    from sft.model.mpt import save_hf

    if is_lora(model):
        raise ValueError("model still has LoRA layers: merge_lora(model) first")
    out = Path(out_dir)
    if is_ours(model):
        save_hf(model, out)
        return out
    try:
        model.save_pretrained(str(out))
    except (ValueError, NotImplementedError) as e:  # GGUF-loaded models refuse save_pretrained
        from sft.model.models import _rebuild

        log.info("save_pretrained refused (%s); saving a rebuilt copy", e)
        _rebuild(model).save_pretrained(str(out))
    return out


def merge_and_export(model: nn.Module, tokenizer, out_dir: str | os.PathLike) -> Path:
    """Merge the adapters into the base weights (in place: the model is plain afterwards) and write
    ``out_dir`` as full weights that ``transformers.AutoModelForCausalLM.from_pretrained`` loads
    (``MptForCausalLM`` for our MPT), plus the tokenizer when given. Returns ``out_dir``."""
    merge_lora(model)
    out = save_merged(model, out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


def apply_from_config(model, cfg) -> None:
    """LoRA adapters after ``.to(device)`` (NF4 quantizes on the device), before checkpointing/sharding/compile."""
    from sft.config import ConfigError, parse_targets

    targets = parse_targets(cfg.lora_targets)
    try:
        if cfg.qlora:
            quantize_nf4(model, targets=targets)
        # fp32 adapters under plain AdamW keep the small updates exact over a bf16 base
        apply_lora(
            model,
            rank=cfg.lora_rank,
            alpha=cfg.lora_alpha,
            dropout=cfg.lora_dropout,
            targets=targets,
            adapter_dtype=torch.float32 if cfg.optimizer == "adamw" else None,
        )
    except ValueError as e:  # no default targets for this architecture, or a target matches nothing
        raise ConfigError(f"--lora: {str(e).splitlines()[0]}") from None
