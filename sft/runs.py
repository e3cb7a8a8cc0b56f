"""The run folder: everything a run leaves behind, in plain files.

Layout of ``<out_dir>/<UTC time>_<model>_<dataset>/``:

- ``config.json``: ``{"config": <resolved TrainConfig>, "git_commit", "git_dirty", "versions", "data":
  {"fingerprint", "stats"}, "model": {...}, "device", "created_utc"}``;
- ``metrics.jsonl``: one JSON object per line. Train lines have exactly :data:`TRAIN_KEYS`; eval lines
  have :data:`EVAL_KEYS` (``eval_loss`` marks them). Plots and reports read this file, never the console;
- ``tb/``: TensorBoard event files (the same scalars);
- ``loss.png``: train loss per step and eval loss;
- ``samples.jsonl``: held-out prompts answered greedily before and after training;
- ``checkpoints/step_XXXXXXX/``: ``model.safetensors`` (the adapter weights alone for a LoRA run),
  ``optimizer.pt``, ``rng.pt``, ``state.json`` (step, data position, token counters), ``config.json``
  (sharded FSDP2 runs: ``dcp/`` + ``rng_rank{r}.pt`` instead, see sft/distributed.py). Written to a temporary folder and renamed
  with ``os.replace``, so a folder named ``step_*`` is always complete; the newest ``keep_last`` are kept;
- ``final/``: Hugging Face format (safetensors, config, tokenizer with the training chat template); for a
  LoRA run the adapters merged into the base;
- ``adapter/`` (LoRA runs only): the adapter alone in peft's format (``adapter_config.json`` +
  ``adapter_model.safetensors``), loadable with ``peft.PeftModel.from_pretrained(base, adapter/)``.

The folder is created only after every input check has passed (:func:`create_run_dir` is called late);
:func:`check_writable` runs first so an unwritable ``out_dir`` fails before any work.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]

TRAIN_KEYS = (
    "step",
    "epoch",
    "loss",
    "lr",
    "grad_norm",
    "step_tokens_processed",
    "step_tokens_nonpad",
    "step_tokens_supervised",
    "tokens_processed",
    "tokens_nonpad",
    "tokens_supervised",
    "tokens_per_s",
    "mfu",
    "peak_mem_gib",
    "step_time_s",
)
EVAL_KEYS = ("step", "epoch", "eval_loss", "eval_tokens_supervised")


class RunError(ValueError):
    """A problem with the run folder (unwritable, nothing to resume); the message is one line."""


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.\-]+", "-", text).strip("-")[:40] or "x"


def run_name(model: str, data: str, now: datetime | None = None) -> str:
    """``<UTC time>_<model>_<dataset>``, e.g. ``20250101-120000_tiny-llama_bundled``."""
    now = now or datetime.now(UTC)
    model_part = _slug(Path(model.rstrip("/")).name.removesuffix(".gguf"))
    data_part = _slug(Path(data.rstrip("/")).stem if os.sep in data or "." in data else data.split("/")[-1])
    return f"{now:%Y%m%d-%H%M%S}_{model_part}_{data_part}"


def check_writable(out_dir: str | Path) -> Path:
    """Make sure ``out_dir`` exists (creating it) and accepts files; RunError otherwise."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise RunError(f"cannot write run folders in '{out}': {e.strerror or e}") from None
    return out


def create_run_dir(out_dir: str | Path, name: str) -> Path:
    """Create ``out_dir/name`` (fails if it exists: runs are never overwritten)."""
    path = Path(out_dir) / name
    try:
        path.mkdir(parents=True, exist_ok=False)
    except FileExistsError:
        raise RunError(f"run folder {path} already exists; pick another --run_name or --resume it") from None
    return path


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def package_versions() -> dict[str, str | None]:
    """Versions of python and the packages whose behaviour a run depends on."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for pkg in ("torch", "transformers", "tokenizers", "datasets", "safetensors", "gguf", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def write_config(run_dir: Path, cfg_dict: dict, *, data: dict, model: dict, device: str) -> dict:
    """Write ``config.json`` (resolved config + provenance); returns what was written."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    info = {
        "config": cfg_dict,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        "versions": package_versions(),
        "data": data,
        "model": model,
        "device": device,
        "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    _write_json(run_dir / "config.json", info)
    return info


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _clean(v: Any) -> Any:
    # JSON has no NaN/Inf: a non-finite loss is written as null (and logged as a warning by the trainer)
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class MetricsWriter:
    """Appends metric lines to ``metrics.jsonl`` and mirrors scalars to TensorBoard under ``tb/``."""

    def __init__(self, run_dir: Path, tensorboard: bool = True):
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir=str(run_dir / "tb"))
            except ImportError:  # tensorboard is in requirements.txt; a run without it still works
                log.warning("tensorboard is not installed: no tb/ event files")

    def train(self, row: dict[str, Any]) -> None:
        assert tuple(row) == TRAIN_KEYS, f"train metric keys differ: {tuple(row)}"
        self._append(row)
        if self.tb is not None:
            for k in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "peak_mem_gib", "step_time_s"):
                if isinstance(row[k], int | float) and math.isfinite(row[k]):
                    self.tb.add_scalar(f"train/{k}", row[k], row["step"])

    def eval(self, row: dict[str, Any]) -> None:
        assert tuple(row) == EVAL_KEYS, f"eval metric keys differ: {tuple(row)}"
        self._append(row)
        if self.tb is not None and row["eval_loss"] is not None:
            self.tb.add_scalar("eval/loss", row["eval_loss"], row["step"])

    def _append(self, row: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop metric lines after ``step`` (a resumed run rewrites them; no duplicates)."""
    rows = [r for r in read_metrics(run_dir) if r.get("step", 0) <= step]
    path = Path(run_dir) / "metrics.jsonl"
    tmp = path.with_name("metrics.jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)


def plot_loss(run_dir: Path) -> Path | None:
    """Write ``loss.png`` (train loss per step, eval loss as markers) from ``metrics.jsonl``."""
    rows = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r and r["loss"] is not None]
    evals = [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", lw=1)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o--", label="held-out loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats / supervised token)")
    ax.set_title(run_dir.name, fontsize=9)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = run_dir / "loss.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def write_samples(run_dir: Path, rows: list[dict[str, Any]]) -> None:
    with (run_dir / "samples.jsonl").open("a", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------- checkpoints

_CKPT = re.compile(r"^step_(\d{7})$")


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _CKPT.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(_CKPT.match(p.name).group(1)))


def _has_lora(model) -> bool:
    # peft_config is set by peft's injection and removed by sft.lora.merge_lora; checking it first spares
    # importing peft for every full fine-tuning checkpoint
    if getattr(model, "peft_config", None) is None:
        return False
    from sft.lora import is_lora

    return is_lora(model)


def _state_dict_for_save(model) -> dict[str, torch.Tensor]:
    """What ``model.safetensors`` of a checkpoint holds: the adapter weights alone for a LoRA model (the
    frozen base is reloaded from its source at resume), else every tensor of the state dict."""
    if _has_lora(model):
        from sft.lora import lora_state_dict

        return lora_state_dict(model)
    # safetensors refuses tensors that share storage (tied embeddings): save a copy of each
    return {k: v.detach().to("cpu").clone().contiguous() for k, v in model.state_dict().items()}


def save_checkpoint(
    run_dir: Path, step: int, *, model, optimizer, state: dict, cfg_dict: dict, keep_last: int
) -> Path:
    """Write ``checkpoints/step_{step:07d}/`` atomically and keep only the newest ``keep_last``.

    A write failure (full disk, read-only file system, quota) removes the temporary folder and raises
    RunError naming the step and the cause; the checkpoints already there are left untouched.
    """
    from safetensors.torch import save_file

    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp_step_{step:07d}_{os.getpid()}"
    try:
        root.mkdir(exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        save_file(_state_dict_for_save(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / "rng.pt")
        _write_json(tmp / "config.json", cfg_dict)
        _write_json(tmp / "state.json", state)  # written last: its presence marks a complete checkpoint
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        kept = list_checkpoints(run_dir)
        cause = getattr(e, "strerror", None) or str(e).strip().splitlines()[0]
        raise RunError(
            f"could not write checkpoint {final.name} ({cause}); "
            + (f"previous checkpoint {kept[-1]} is intact" if kept else "no earlier checkpoint")
        ) from None
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


CHECKPOINT_FILES = ("model.safetensors", "optimizer.pt", "rng.pt", "config.json", "state.json")


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why ``ckpt`` cannot be resumed from (a file missing, truncated or corrupt), or ``None``.

    A sharded checkpoint (a ``dcp/`` folder, written under FSDP2) is judged by
    :func:`sft.distributed.dcp_checkpoint_problem`; the rest of this docstring is about single-process ones.

    Cheap: reads the JSON files, the safetensors header (safetensors itself refuses a file its header
    does not exactly cover, i.e. a truncated one) and the zip directories of the ``torch.save`` files
    (stored at their end, so a truncated file has none). Does not read the tensors.
    """
    import zipfile

    from safetensors import safe_open

    ckpt = Path(ckpt)
    if (ckpt / "dcp").is_dir():  # sharded (FSDP2) checkpoint: its own layout and checks
        from sft.distributed import dcp_checkpoint_problem

        return dcp_checkpoint_problem(ckpt)
    for name in CHECKPOINT_FILES:
        if not (ckpt / name).is_file():
            return f"{name} is missing"

    def read_json(path):
        json.loads(path.read_text(encoding="utf-8"))

    def read_safetensors(path):
        with safe_open(str(path), framework="pt") as f:
            f.keys()

    def read_zip(path):
        with zipfile.ZipFile(path) as z:
            z.namelist()

    readers = {"model.safetensors": read_safetensors, "optimizer.pt": read_zip, "rng.pt": read_zip}
    for name in CHECKPOINT_FILES:
        try:
            readers.get(name, read_json)(ckpt / name)
        except Exception as e:  # json, safetensors and zipfile each raise their own types
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            return f"{name} is unreadable ({type(e).__name__}: {first})"
    return None


def load_checkpoint(ckpt: Path, *, model, optimizer) -> dict:
    """Restore weights, optimizer state and RNG from ``ckpt``; return its ``state.json``.

    For a LoRA model (adapters injected, same settings as the run that saved it) only the adapter
    weights are read; the base must already be the run's base (loaded from its source)."""
    from safetensors.torch import load_file

    sd = load_file(str(ckpt / "model.safetensors"), device=str(next(model.parameters()).device))
    if _has_lora(model):  # adapter weights only (strict: every adapter weight, nothing else)
        from sft.lora import load_lora_state_dict

        try:
            load_lora_state_dict(model, sd)
        except ValueError as e:
            raise RunError(f"{ckpt}: {e} (was it written by a run with the same --lora settings?)") from None
    else:
        model.load_state_dict(sd)
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True))
    rng = torch.load(ckpt / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return json.loads((ckpt / "state.json").read_text())


def find_resume(out_dir: str | Path, resume: str) -> tuple[Path, Path]:
    """``(run_dir, latest usable checkpoint)`` for ``--resume``: ``latest`` = newest run in ``out_dir`` that
    has a checkpoint, else a run folder path (or a name inside ``out_dir``). Single-process and sharded
    (FSDP2, ``dcp/``) checkpoints alike; the trainer then checks the world size. A damaged checkpoint
    (:func:`checkpoint_problem`) is skipped, with a warning, for the newest intact one before it;
    RunError (naming each problem) if there is none."""
    if resume in ("latest", "true", "1"):
        runs = sorted(
            (p for p in Path(out_dir).glob("*") if p.is_dir() and list_checkpoints(p)), key=lambda p: p.name
        )
        if not runs:
            raise RunError(f"--resume=latest: no run with a checkpoint in '{out_dir}'")
        run_dir = runs[-1]
    else:
        run_dir = Path(resume)
        if not run_dir.is_dir() and (Path(out_dir) / resume).is_dir():
            run_dir = Path(out_dir) / resume
        if not run_dir.is_dir():
            raise RunError(f"--resume={resume}: no such run folder")
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        raise RunError(f"--resume={resume}: {run_dir} has no complete checkpoint")
    problems = []
    for ckpt in reversed(ckpts):  # newest first; a damaged one is skipped for the one before it
        why = checkpoint_problem(ckpt)
        if why is None:
            if problems:
                log.warning("resuming from %s instead: %s", ckpt.name, "; ".join(problems))
            return run_dir, ckpt
        problems.append(f"{ckpt.name}: {why}")
    raise RunError(f"--resume={resume}: no usable checkpoint in {run_dir} ({'; '.join(problems)})")


def save_final(run_dir: Path, model, tokenizer) -> Path:
    """Write ``final/`` in Hugging Face format (safetensors, config, tokenizer); returns its path.

    The tokenizer must already carry the training chat template. Our fast MPT (sft/mpt.py) is written
    with its ``save_hf``; a transformers model with ``save_pretrained``; one that refuses (GGUF-loaded) is
    first rebuilt from its config with the same weights.
    """
    out = Path(run_dir) / "final"
    tmp = Path(run_dir) / ".final.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    if hasattr(model, "forward_hidden") and not hasattr(model, "save_pretrained"):
        from sft import mpt

        mpt.save_hf(model, tmp)
    else:
        try:
            model.save_pretrained(str(tmp))
        except (ValueError, NotImplementedError):
            from sft.models import _rebuild

            _rebuild(model).save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def _read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))
