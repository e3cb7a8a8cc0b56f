"""GGUF writing (llama.cpp, Ollama, LM Studio) in pure Python, chat template inside; the command line is sft/export.py.

``export_gguf(final_dir, qtype, out=None, force=False) -> Path`` writes one GGUF file with the ``gguf``
package's ``GGUFWriter`` (no llama.cpp build, no subprocess) and returns its path. ``final_dir`` is a
Hugging Face folder (a run's ``final/``, which for a LoRA run holds the merged weights) or a run folder,
which means its ``final/``. Default output: ``<final>/model-<qtype>.gguf``.

What goes in:
- weights, read tensor by tensor from ``*.safetensors`` (pickles are refused) and written one at a
  time, so memory holds one tensor: 1-D tensors (norms, biases) as F32, the others as F16, BF16 or
  Q8_0 (``gguf.quants``, bit-exact with ggml's reference; a row length that is not a multiple of 32
  falls back to F16, as llama.cpp's converter does). Names are llama.cpp's (``gguf.TensorNameMap``).
- architectures: the Llama family (``llama``, ``mistral`` -> llama.cpp ``llama``, with Q/K rows
  permuted from Hugging Face's rotary layout to llama.cpp's, as its ``convert_hf_to_gguf.py`` does, the
  inverse of what transformers' GGUF loader undoes; ``qwen2`` -> ``qwen2``, not permuted, as llama.cpp)
  and MPT (llama.cpp ``mpt``: ALiBi bias max, ``clip_qkv`` as ``clamp_kqv``, LayerNorm eps). A tied
  LM head is not stored (llama.cpp then reuses ``token_embd``).
- hyper-parameters: context length, widths, heads, norm epsilon, RoPE base / dimension / scaling
  (``linear``; ``llama3`` as llama.cpp's ``rope_freqs`` tensor; other kinds refused).
- tokenizer (byte-level BPE only, llama.cpp's ``gpt2`` model): tokens padded to the embedding rows,
  merges, token types (added special = CONTROL, other added = USER_DEFINED), BOS / EOS / UNK / PAD
  ids, add-BOS / add-EOS flags, the pre-tokenizer name read off the tokenizer's structure, the chat
  template byte for byte as saved in ``final/`` (``chat_template.jinja`` or ``tokenizer_config.json``),
  and the template's end-of-turn token as EOT and as EOS (so a runtime stops where training taught
  the model to stop; EOS stays the tokenizer's when the template itself writes ``eos_token``, and when
  the marker is several tokens, in which case a warning says so).
- ``general.name`` (the run folder's name) and, from the run's ``config.json``, the git commit, dirty
  flag and base model (``sft.git_commit``, ``sft.git_dirty``, ``sft.base_model``, ``general.description``).

Never over what exists: inside a run folder (or a bare model folder) the output may only be a new
``*.gguf`` name outside ``checkpoints/`` (:func:`check_output`, ``--force`` included), so an export cannot
replace the weights, config or checkpoints it reads; elsewhere an existing file needs ``--force``.

Failure: :class:`ExportError`, one line (the CLI prints ``error: ...`` and exits 2). Nothing partial is
left: the file is written as a hidden temporary in the output folder and renamed at the very end.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

QTYPES = ("f16", "bf16", "q8_0")
# Hugging Face model_type -> llama.cpp architecture
ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "mpt": "mpt"}
EXPORTABLE = "llama, mistral, qwen2 (the Llama family, SmolLM2 included) and mpt"

# pre-tokenizer split regexes, as in the tokenizer.json of Qwen2 and Llama-3 (llama.cpp: "qwen2", "llama-bpe")
_QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


class ExportError(ValueError):
    """The export cannot be done; the message is one line."""


# ----------------------------------------------------------------------------- locating


def resolve_final_dir(path: str | os.PathLike) -> Path:
    """The model folder: ``path/final`` for a run folder (its own config.json is the run's), else ``path``."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ExportError(f"{p} does not exist")
    if not p.is_dir():
        raise ExportError(f"{p} is not a folder (give a run folder or its final/)")
    if (p / "final" / "config.json").is_file():
        return p / "final"
    if _is_run_folder(p):  # its config.json is the run's, not a model's: say what is missing
        ckpts = sorted((p / "checkpoints").glob("step_*")) if (p / "checkpoints").is_dir() else []
        where = f"; its newest checkpoint is {ckpts[-1].name}" if ckpts else ""
        raise ExportError(
            f"{p} is a run folder with no final/ model (the run has not finished, or ran with "
            f"--no-save_final{where}); finish it with --resume, then export"
        )
    if (p / "config.json").is_file():
        return p
    raise ExportError(f"no model in {p} (no config.json there nor in {p / 'final'})")


def _is_run_folder(p: Path) -> bool:
    """A run folder (what the trainer writes: metrics.jsonl, checkpoints/, final/, or the run's config.json),
    not a model folder. The same test as ``sft.training.runs.is_run_folder``, which this wing may not import."""
    if not p.is_dir() or any(p.glob("*.safetensors")):
        return False
    if (p / "metrics.jsonl").is_file() or (p / "checkpoints").is_dir() or (p / "final").is_dir():
        return True
    try:
        info = json.loads((p / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and isinstance(info.get("config"), dict) and "created_utc" in info


def _protected_zone(final: Path) -> Path:
    """The folder an output may not write into except as a new ``*.gguf``: the run folder when ``final`` is
    a run's ``final/`` (its model, checkpoints, config and metrics), else the model folder itself."""
    final = final.resolve()
    if final.name == "final" and _is_run_folder(final.parent):
        return final.parent
    return final


def check_output(final: Path, out_path: Path) -> None:
    """ExportError (one line) when ``out_path`` would write over what the export reads or what a run keeps:
    inside the run folder (or the model folder) only a ``*.gguf`` name is allowed, and never under
    ``checkpoints/``; a folder is refused."""
    if out_path.is_dir():
        raise ExportError(f"output {out_path} is a folder; give a file name")
    zone = _protected_zone(final)
    target = out_path.parent.resolve() / out_path.name
    if target.is_symlink() or target.exists():
        target = target.resolve()
    if target != zone and zone not in target.parents:
        return
    inside = "run folder" if zone != final.resolve() else "model folder"
    if (zone / "checkpoints") in target.parents or target.suffix.lower() != ".gguf":
        raise ExportError(
            f"output {out_path} is inside the {inside} {zone} and would write over its model, "
            f"checkpoints or records; give a new *.gguf name (default: {default_output(final, 'TYPE')}) "
            "or a path outside it"
        )


def default_output(final_dir: Path, qtype: str) -> Path:
    return Path(final_dir) / f"model-{qtype}.gguf"


def _weight_files(final: Path) -> list[Path]:
    files = sorted(final.glob("*.safetensors"))
    if files:
        return files
    if any(final.glob("*.bin")) or any(final.glob("*.pt")):
        raise ExportError(f"{final} holds only pickle weights (.bin/.pt); export reads safetensors only")
    raise ExportError(f"no model weights (*.safetensors) in {final}")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ExportError(
            f"cannot read {path} ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from None


def _run_info(final: Path) -> dict:
    """The run's provenance (``final/../config.json`` written by ``sft.training.runs.write_config``), or ``{}``."""
    cfg = final.parent / "config.json"
    if final.name != "final" or not cfg.is_file():
        return {}
    try:
        info = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) and "git_commit" in info else {}


# ----------------------------------------------------------------------------- tensors


@dataclass
class _Tensor:
    """One GGUF tensor: where its data comes from and how it is transformed and typed."""

    name: str  # llama.cpp name
    src: str | None  # safetensors key (None: computed, ``data`` set)
    shape: tuple[int, ...]  # numpy order (rows, cols)
    ggml_type: Any  # gguf.GGMLQuantizationType
    permute_heads: int = 0  # > 0: llama Q/K row permutation with this many heads
    data: np.ndarray | None = None


def llama_permute(w, n_head: int):
    """Rows of a Q or K projection (weight ``[n_head*head_dim, d]`` or bias) from Hugging Face's rotary
    layout (each head's first half / second half) to llama.cpp's (interleaved pairs), per head.

    The same operation as ``LlamaModel.permute`` in llama.cpp's ``convert_hf_to_gguf.py``; transformers'
    GGUF loader applies its inverse (``_reverse_permute_weights``)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(head_dim: int, theta: float, rope: dict) -> np.ndarray:
    """llama.cpp's ``rope_freqs`` for ``rope_type == "llama3"``: per frequency, the divisor of the default
    inverse frequency (1 for short wavelengths, ``factor`` for long ones, smooth in between)."""
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_ctx = float(rope.get("original_max_position_embeddings", 8192))
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _target_type(qtype: str, shape: tuple[int, ...]):
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as T

    if len(shape) < 2:
        return T.F32
    if qtype == "f16":
        return T.F16
    if qtype == "bf16":
        return T.BF16
    if shape[-1] % GGML_QUANT_SIZES[T.Q8_0][0] != 0:
        log.info("row length %d is not a multiple of 32: kept as F16", shape[-1])
        return T.F16
    return T.Q8_0


def _nbytes(shape: tuple[int, ...], ggml_type) -> int:
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[ggml_type]
    return int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block) * size if shape else size


def _encode(arr: np.ndarray, ggml_type) -> np.ndarray:
    from gguf import GGMLQuantizationType as T
    from gguf import quants

    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if ggml_type == T.F32:
        return arr
    if ggml_type == T.F16:
        return arr.astype(np.float16)
    return quants.quantize(arr, ggml_type)  # BF16, Q8_0: uint8 bytes, rows of the byte shape


class _Weights:
    """Tensors of a (possibly sharded) safetensors checkpoint, read one at a time as float32 torch."""

    def __init__(self, files: list[Path]):
        from safetensors import safe_open

        self._handles, self.where, self.shapes = [], {}, {}
        try:
            for f in files:
                h = safe_open(str(f), framework="pt")
                self._handles.append(h)
                for k in h.keys():
                    self.where[k] = h
                    self.shapes[k] = tuple(h.get_slice(k).get_shape())
        except Exception as e:  # truncated / corrupt file: many error types from the reader
            raise ExportError(f"cannot read weights in {files[0].parent} ({type(e).__name__}: {e})") from None

    def get(self, key: str):
        return self.where[key].get_tensor(key).float()


def _model_arch(arch: str):
    import gguf

    return {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2, "mpt": gguf.MODEL_ARCH.MPT}[arch]


def _plan_tensors(arch: str, cfg, weights: _Weights, qtype: str, tied: bool) -> list[_Tensor]:
    import gguf

    n_layers = cfg.n_layers if arch == "mpt" else cfg.num_hidden_layers
    name_map = gguf.get_tensor_name_map(_model_arch(arch), n_layers)
    plan: list[_Tensor] = []
    for key, shape in weights.shapes.items():
        if key == "lm_head.weight" and tied:
            continue  # tied head: llama.cpp falls back to token_embd
        if key.endswith("rotary_emb.inv_freq"):
            continue
        name = name_map.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(f"tensor '{key}' has no llama.cpp name in architecture '{arch}'")
        heads = 0
        if arch == "llama" and re.search(r"\.attn_q\.(weight|bias)$", name):
            heads = cfg.num_attention_heads
        elif arch == "llama" and re.search(r"\.attn_k\.(weight|bias)$", name):
            heads = cfg.num_key_value_heads
        plan.append(_Tensor(name, key, shape, _target_type(qtype, shape), heads))
    return plan


# ----------------------------------------------------------------------------- tokenizer


def _pre_tokenizer_name(backend: dict, arch: str) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for this tokenizer.json, from its pre-tokenizer structure."""
    pre = backend.get("pre_tokenizer") or {}
    seq = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    seq = [p for p in seq if p]

    def byte_level(p, regex):
        return p.get("type") == "ByteLevel" and bool(p.get("use_regex", True)) == regex

    def split(p, pattern):
        return p.get("type") == "Split" and (p.get("pattern") or {}).get("Regex") == pattern

    if len(seq) == 1 and byte_level(seq[0], True):
        return "mpt" if arch == "mpt" else "gpt-2"  # the same regex in llama.cpp
    if len(seq) == 2 and seq[0].get("type") == "Digits" and seq[0].get("individual_digits"):
        if byte_level(seq[1], True):
            return "smollm"
    if len(seq) == 2 and byte_level(seq[1], False):
        if split(seq[0], _QWEN2_SPLIT):
            return "qwen2"
        if split(seq[0], _LLAMA3_SPLIT):
            return "llama-bpe"
    log.warning(
        "pre-tokenizer %s has no llama.cpp name here: written as 'default', so llama.cpp may split "
        "some texts differently from training",
        json.dumps(pre)[:160],
    )
    return "default"


def _raw_chat_template(final: Path) -> str | list | None:
    """The chat template exactly as saved in ``final/``: ``chat_template.jinja``, else tokenizer_config's."""
    jinja = final / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_bytes().decode("utf-8")
    tc = final / "tokenizer_config.json"
    if tc.is_file():
        return _read_json(tc).get("chat_template")
    return None


@dataclass
class _TokenizerMeta:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    ids: dict[str, int] = field(default_factory=dict)  # bos / eos / unk / pad / eot
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | list | None = None


def _exportable_tokenizer(tok, where) -> tuple[dict, list[str]]:
    """``(tokenizer.json as a dict, merges)`` of a tokenizer GGUF runtimes can use (byte-level BPE with
    merges), else ExportError naming why not."""
    backend_tok = getattr(tok, "backend_tokenizer", None)
    if backend_tok is None:
        raise ExportError(f"the tokenizer in {where} is not a fast (tokenizer.json) tokenizer")
    backend = json.loads(backend_tok.to_str())
    model = backend.get("model") or {}
    byte_level = any("ByteLevel" in json.dumps(backend.get(k) or {}) for k in ("pre_tokenizer", "decoder"))
    if model.get("type") != "BPE" or not byte_level:
        raise ExportError(
            f"only byte-level BPE tokenizers (GPT-2 style) export; this one is {model.get('type')} "
            f"{'byte-level' if byte_level else 'not byte-level (sentencepiece-style)'}"
        )
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    if not merges:
        raise ExportError(
            "the tokenizer has no BPE merges (a bare byte tokenizer); GGUF runtimes need a merges list"
        )
    return backend, merges


def check_exportable(model, tokenizer) -> None:
    """ExportError (one line) when ``model`` (its ``config.model_type``) or ``tokenizer`` could not be
    written as GGUF: what the trainer checks for ``--export_gguf`` before training, not after."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHS:
        raise ExportError(f"architecture '{model_type}' does not export to GGUF; exportable: {EXPORTABLE}")
    _exportable_tokenizer(tokenizer, "this run")


def _tokenizer_meta(final: Path, n_vocab: int, arch: str) -> _TokenizerMeta:
    from gguf import TokenType
    from transformers import AutoTokenizer

    from sft.data.render import TemplateError, bos_to_add, end_of_turn_text

    try:
        tok = AutoTokenizer.from_pretrained(str(final))
    except Exception as e:  # missing/corrupt tokenizer files raise many types
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise ExportError(f"cannot load the tokenizer in {final} ({type(e).__name__}: {first})") from None
    backend, merges = _exportable_tokenizer(tok, final)
    vocab = tok.get_vocab()
    if max(vocab.values()) >= n_vocab:
        raise ExportError(
            f"the tokenizer has ids up to {max(vocab.values())} but the model only {n_vocab} rows"
        )
    by_id = {i: t for t, i in vocab.items()}
    added = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        if i in added:
            tokens.append(added[i].content)
            types.append(int(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED))
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(int(TokenType.NORMAL))
        else:  # embedding rows beyond the tokenizer (padded vocabulary)
            tokens.append(f"[PAD{i}]")
            types.append(int(TokenType.UNUSED))

    meta = _TokenizerMeta(tokens, types, merges, _pre_tokenizer_name(backend, arch))
    for role in ("bos", "eos", "unk", "pad"):
        tid = getattr(tok, f"{role}_token_id", None)
        if tid is not None:
            meta.ids[role] = int(tid)
    meta.add_bos = bos_to_add(tok) is not None
    with_special = tok("a", add_special_tokens=True)["input_ids"]
    plain = tok("a", add_special_tokens=False)["input_ids"]
    meta.add_eos = bool(
        tok.eos_token_id is not None
        and len(with_special) > len(plain)
        and with_special[-1] == tok.eos_token_id
    )

    meta.chat_template = _raw_chat_template(final)
    default_tmpl = meta.chat_template
    if isinstance(default_tmpl, list):
        default_tmpl = next((t.get("template") for t in default_tmpl if t.get("name") == "default"), None)
    if not default_tmpl:
        log.warning("no chat template in %s: GGUF runtimes will use their own default", final)
        return meta
    try:
        marker = end_of_turn_text(tok, default_tmpl)
    except TemplateError as e:
        log.warning("end-of-turn token not derived from the chat template (%s)", e)
        return meta
    marker_ids = tok(marker, add_special_tokens=False)["input_ids"] if marker else []
    if len(marker_ids) == 1:
        meta.ids["eot"] = int(marker_ids[0])
        if "eos_token" not in default_tmpl:  # else a runtime rendering the template needs the tokenizer's EOS
            meta.ids["eos"] = int(marker_ids[0])
    elif marker:
        log.warning(
            "the end-of-turn marker %r is %d tokens of this tokenizer: EOS stays %r; give the runtime "
            "that marker as a stop string",
            marker,
            len(marker_ids),
            tok.eos_token,
        )
    return meta


# ----------------------------------------------------------------------------- metadata


def _rope(cfg) -> tuple[float, dict]:
    """(theta, rope parameters) across transformers' ``rope_parameters`` (5.x) and ``rope_scaling``."""
    rp = dict(getattr(cfg, "rope_parameters", None) or {})
    legacy = getattr(cfg, "rope_scaling", None) or {}
    if isinstance(legacy, dict):
        rp = {**legacy, **rp}
    theta = rp.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    rp.setdefault("rope_type", rp.get("type", "default"))
    return float(theta), rp


def _arch_metadata(w, arch: str, cfg) -> list[_Tensor]:
    """Hyper-parameters under ``<arch>.*``; returns extra computed tensors (``rope_freqs``)."""
    import gguf

    extra: list[_Tensor] = []
    if arch == "mpt":
        attn = cfg.attn_config
        attn = attn.to_dict() if hasattr(attn, "to_dict") else dict(attn or {})
        for key, ok in (
            ("softmax_scale", attn.get("softmax_scale") is None),
            ("qk_ln", not attn.get("qk_ln")),
            ("prefix_lm", not attn.get("prefix_lm")),
        ):
            if not ok:
                raise ExportError(
                    f"MPT attn_config.{key}={attn.get(key)!r} has no llama.cpp 'mpt' equivalent"
                )
        if getattr(cfg, "logit_scale", None) not in (None, 1, 1.0):
            raise ExportError(f"MPT logit_scale={cfg.logit_scale!r} has no llama.cpp 'mpt' equivalent")
        w.add_context_length(int(cfg.max_seq_len))
        w.add_embedding_length(int(cfg.d_model))
        w.add_block_count(int(cfg.n_layers))
        w.add_feed_forward_length(int(cfg.expansion_ratio * cfg.d_model))
        w.add_head_count(int(cfg.n_heads))
        if attn.get("kv_n_heads"):
            w.add_head_count_kv(int(attn["kv_n_heads"]))
        w.add_layer_norm_eps(float(getattr(cfg, "layer_norm_epsilon", 1e-5)))
        if attn.get("clip_qkv") is not None:
            w.add_clamp_kqv(float(attn["clip_qkv"]))
        w.add_max_alibi_bias(float(attn.get("alibi_bias_max", 8)) if attn.get("alibi", True) else 0.0)
        return extra

    heads, kv = int(cfg.num_attention_heads), int(cfg.num_key_value_heads or cfg.num_attention_heads)
    hidden = int(cfg.hidden_size)
    head_dim = int(getattr(cfg, "head_dim", None) or hidden // heads)
    w.add_context_length(int(cfg.max_position_embeddings))
    w.add_embedding_length(hidden)
    w.add_block_count(int(cfg.num_hidden_layers))
    w.add_feed_forward_length(int(cfg.intermediate_size))
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    theta, rope = _rope(cfg)
    w.add_rope_freq_base(theta)
    w.add_rope_dimension_count(head_dim)
    if head_dim != hidden // heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    kind = rope["rope_type"]
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    elif kind == "llama3" and arch == "llama":
        factors = llama3_rope_factors(head_dim, theta, rope)
        extra.append(
            _Tensor("rope_freqs.weight", None, factors.shape, gguf.GGMLQuantizationType.F32, data=factors)
        )
    elif kind != "default":
        raise ExportError(f"RoPE scaling '{kind}' is not exported (have: default, linear, llama3 for llama)")
    window = getattr(cfg, "sliding_window", None)
    uses_window = getattr(cfg, "use_sliding_window", arch == "llama")
    if window and uses_window and window < int(cfg.max_position_embeddings):
        log.warning(
            "sliding_window=%d is not in llama.cpp's '%s': beyond %d tokens it attends to the whole context",
            window,
            arch,
            window,
        )
    return extra


def _general_metadata(w, final: Path, qtype: str) -> None:
    import gguf

    info = _run_info(final)
    name = final.parent.name if final.name == "final" else final.name
    w.add_type("model")
    w.add_name(name)
    w.add_file_type(
        {
            "f16": gguf.LlamaFileType.MOSTLY_F16,
            "bf16": gguf.LlamaFileType.MOSTLY_BF16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        }[qtype]
    )
    if qtype == "q8_0":
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if not info:
        return
    commit = info.get("git_commit")
    base = (info.get("config") or {}).get("model")
    if commit:
        w.add_string("sft.git_commit", str(commit))
    if info.get("git_dirty") is not None:
        w.add_bool("sft.git_dirty", bool(info["git_dirty"]))
    if base:
        w.add_string("sft.base_model", str(base))
        w.add_base_model_count(1)
        w.add_base_model_name(0, str(base))
    desc = f"fine-tuned with sft: run {name}"
    if base:
        desc += f", from {base}"
    if commit:
        desc += f", git {commit}{' (uncommitted changes)' if info.get('git_dirty') else ''}"
    w.add_description(desc)


def _tokenizer_metadata(w, meta: _TokenizerMeta) -> None:
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(meta.pre)
    w.add_token_list(meta.tokens)
    w.add_token_types(meta.types)
    w.add_token_merges(meta.merges)
    setters = {
        "bos": w.add_bos_token_id,
        "eos": w.add_eos_token_id,
        "unk": w.add_unk_token_id,
        "pad": w.add_pad_token_id,
        "eot": w.add_eot_token_id,
    }
    for role, tid in meta.ids.items():
        setters[role](tid)
    w.add_add_bos_token(meta.add_bos)
    w.add_add_eos_token(meta.add_eos)
    if meta.chat_template:
        w.add_chat_template(meta.chat_template)


# ----------------------------------------------------------------------------- export


def _check_space(folder: Path, need: int) -> None:
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if free < need:
        raise ExportError(
            f"not enough disk space in {folder}: the GGUF needs about {need / 1e6:.1f} MB, {free / 1e6:.1f} MB free"
        )


def export_gguf(
    final_dir: str | os.PathLike, qtype: str, out: str | os.PathLike | None = None, force: bool = False
) -> Path:
    """Write ``final_dir`` (a run folder or its ``final/``) as one GGUF file of type ``qtype``; return its path.

    ``qtype``: ``"f16"``, ``"bf16"`` or ``"q8_0"``. ``out`` defaults to ``<final>/model-<qtype>.gguf``; an
    existing file is refused unless ``force``. Raises :class:`ExportError` (one line) for an unknown type,
    a folder with no model, an architecture or tokenizer that cannot be exported, an existing output, a
    full disk; no partial ``.gguf`` is left behind.
    """
    from transformers import AutoConfig

    qtype = str(qtype).lower()
    if qtype not in QTYPES:
        raise ExportError(f"unknown GGUF type '{qtype}' (have: {', '.join(QTYPES)})")
    final = resolve_final_dir(final_dir)
    out_path = Path(out).expanduser() if out is not None else default_output(final, qtype)
    check_output(final, out_path)
    if out_path.exists() and not force:
        raise ExportError(f"{out_path} already exists; pass --force to overwrite it")
    if not out_path.parent.is_dir():
        raise ExportError(f"output folder {out_path.parent} does not exist")

    model_type = _read_json(final / "config.json").get("model_type")
    if model_type is None:
        raise ExportError(f"{final / 'config.json'} has no model_type: not a Hugging Face model folder")
    if model_type not in ARCHS:
        raise ExportError(f"architecture '{model_type}' does not export to GGUF; exportable: {EXPORTABLE}")
    arch = ARCHS[model_type]
    weights = _Weights(_weight_files(final))
    try:
        cfg = AutoConfig.from_pretrained(str(final), trust_remote_code=False)
    except Exception as e:
        raise ExportError(f"cannot read {final / 'config.json'} ({type(e).__name__}: {e})") from None

    embed_key = "transformer.wte.weight" if arch == "mpt" else "model.embed_tokens.weight"
    if embed_key not in weights.shapes:
        raise ExportError(f"no '{embed_key}' in the weights of {final}")
    n_vocab = weights.shapes[embed_key][0]
    tied = bool(getattr(cfg, "tie_word_embeddings", arch == "mpt"))
    plan = _plan_tensors(arch, cfg, weights, qtype, tied)
    meta = _tokenizer_meta(final, n_vocab, arch)

    import gguf

    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[_model_arch(arch)])
    _general_metadata(writer, final, qtype)
    writer.add_vocab_size(n_vocab)
    plan += _arch_metadata(writer, arch, cfg)
    _tokenizer_metadata(writer, meta)
    for t in plan:
        writer.add_tensor_info(
            t.name, t.shape, np.dtype(np.float32), _nbytes(t.shape, t.ggml_type), t.ggml_type
        )
    _check_space(out_path.parent, sum(_nbytes(t.shape, t.ggml_type) for t in plan) + 64 * len(meta.tokens))

    t0 = time.perf_counter()
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in plan:
            if t.data is not None:
                arr = t.data
            else:
                x = weights.get(t.src)
                if t.permute_heads:
                    x = llama_permute(x, t.permute_heads)
                arr = x.numpy()
            writer.write_tensor_data(_encode(arr, t.ggml_type))
        writer.flush()
        for f in writer.fout or []:
            os.fsync(f.fileno())
        writer.close()
        os.replace(tmp, out_path)
    except OSError as e:
        why = "no space left on device" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise ExportError(f"cannot write {out_path}: {why}") from None
    except Exception as e:  # a tensor the reader cannot decode, a quantizer refusing a shape...
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise ExportError(f"export to {out_path} failed ({type(e).__name__}: {first})") from None
    finally:
        writer.close()
        if tmp.exists():
            tmp.unlink()
    log.info("wrote %s in %.1f s", out_path, time.perf_counter() - t0)
    return out_path


# ----------------------------------------------------------------------------- CLI
