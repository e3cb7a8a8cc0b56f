"""The run folder: everything a run leaves behind, in plain files.

Layout of ``<out_dir>/<UTC time>_<model>_<dataset>/``:

- ``config.json``: ``{"config": <resolved TrainConfig>, "git_commit", "git_dirty", "versions", "data":
  {"fingerprint", "inputs", "stats"}, "model": {...}, "device", "created_utc"}``; ``inputs`` are the parts
  of the data fingerprint (``sft.data.prepare``), compared on ``--resume`` by :func:`check_resume_inputs`;
- ``metrics.jsonl``: one JSON object per line. Train lines have exactly :data:`TRAIN_KEYS`; eval lines
  have :data:`EVAL_KEYS` (``eval_loss`` marks them). Plots and reports read this file, never the console;
- ``tb/``: TensorBoard event files (the same scalars);
- ``loss.png``: train loss per step and eval loss;
- ``samples.jsonl``: held-out prompts answered greedily before and after training;
- ``checkpoints/step_XXXXXXX/``: ``model.safetensors`` (the adapter weights alone for a LoRA run),
  ``optimizer.pt``, ``rng.pt``, ``state.json`` (step, data position, token counters), ``config.json``
  (sharded FSDP2 runs: ``dcp/`` + ``rng_rank{r}.pt`` instead, see sft/training/distributed.py). Written to a temporary folder and renamed
  with ``os.replace``, so a folder named ``step_*`` is always complete; the newest ``keep_last`` are kept;
- ``final/``: Hugging Face format (safetensors, config, tokenizer with the training chat template); for a
  LoRA run the adapters merged into the base;
- ``adapter/`` (LoRA runs only): the adapter alone in peft's format (``adapter_config.json`` +
  ``adapter_model.safetensors``), loadable with ``peft.PeftModel.from_pretrained(base, adapter/)``;
- ``finished.json``: ``{"step": N}``, written by :func:`mark_finished` when the run reached its end (an
  interrupted or ``--stop_after`` run has none); ``--resume=latest`` skips finished runs;
- ``.lock``: present while a process holds the run (:func:`hold_run_lock`): one run folder, one writer;
- ``train.log``: every log record of the run (its own lines and the warnings of other packages, which stay
  off the console), with time and source (:class:`RunLog`); a resumed run appends to it.

The folder is created only after every input check has passed (:func:`create_run_dir` is called late);
:func:`check_writable` runs first so an unwritable ``out_dir`` fails before any work. A run name is one
path component (:func:`check_run_name`); a generated name is made unique (``create_run_dir(...,
unique=True)`` adds ``-2``, ``-3``... when two runs start in the same second).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]

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
    "mfu_nonpad",
    "peak_mem_gib",
    "step_time_s",
)
# eval_loss over every held-out token; per source in eval_loss_by_source (name -> loss); token accuracy
# and stop rate as in sft/training/evaluation.py (None when not measured)
EVAL_KEYS = (
    "step",
    "epoch",
    "eval_loss",
    "eval_tokens_supervised",
    "eval_token_accuracy",
    "eval_stop_rate",
    "eval_loss_by_source",
)


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


def check_run_name(name: str) -> str:
    """Return ``name`` if it can name a run folder: one path component, so the run stays inside ``out_dir``.

    RunError (one line) for an empty name, ``.``/``..``, a name with ``/`` or ``\\``, a leading ``.``
    (hidden: ``--resume=latest`` would not see it), a NUL or other control character, or over 200 bytes.
    """
    why = None
    if not isinstance(name, str) or not name.strip():
        why = "it is empty"
    elif name in (".", ".."):
        why = "it names a folder above or at out_dir"
    elif "/" in name or "\\" in name or (os.altsep and os.altsep in name):
        why = "it has a path separator (a run name is one folder name, not a path)"
    elif name.startswith("."):
        why = "it starts with '.' (a hidden folder)"
    elif any(ord(c) < 32 or ord(c) == 127 for c in name):
        why = "it has a control character"
    elif len(name.encode("utf-8", "surrogatepass")) > 200:
        why = "it is longer than 200 bytes"
    elif name != name.strip():
        why = "it starts or ends with white space"
    if why:
        raise RunError(f"--run_name={name!r} cannot name a run folder: {why}")
    return name


def create_run_dir(out_dir: str | Path, name: str, *, unique: bool = False) -> Path:
    """Create ``out_dir/name`` and return it; runs are never overwritten.

    ``name`` must pass :func:`check_run_name`. If the folder exists: RunError, or with ``unique=True`` (a
    generated name) the first free ``name-2``, ``name-3``... is taken instead. Creation is atomic
    (``mkdir`` fails on an existing folder), so two processes starting in the same second never share one.
    """
    check_run_name(name)
    out = Path(out_dir)
    for k in range(1, 1000 if unique else 2):
        path = out / (name if k == 1 else f"{name}-{k}")
        try:
            path.mkdir(parents=True, exist_ok=False)
        except FileExistsError:
            continue
        return path
    if unique:
        raise RunError(f"no free run folder name {name}-N in {out}")
    raise RunError(f"run folder {out / name} already exists; pick another --run_name or --resume it")


LOCK_NAME = ".lock"


def _lock_holder(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError:
        text = ""
    return text.split()[0] if text else "?"


@contextlib.contextmanager
def hold_run_lock(run_dir: str | Path) -> Iterator[Path]:
    """Hold an exclusive lock on ``run_dir`` for the life of a run: one run folder, one writer.

    ``fcntl.flock`` on ``<run_dir>/.lock``, which holds this process's PID. If another process holds it,
    raises RunError ``run folder X is in use by PID N`` at once (no waiting). The lock is released and the
    file removed on exit; a process that dies (even by SIGKILL) releases it with its file descriptors,
    so a stale ``.lock`` file never blocks a later run. Not re-entrant within a process: hold it once.
    (A lock taken on a file that another holder removed meanwhile is dropped and taken again on the new
    file, so removing it on exit is safe.)
    """
    import fcntl

    run_dir = Path(run_dir)
    path = run_dir / LOCK_NAME
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunError(f"cannot lock run folder {run_dir}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunError(
                    f"run folder {run_dir} is in use by PID {_lock_holder(path)}; "
                    "wait for it to end (or stop it) before running in this folder"
                ) from None
            raise RunError(f"cannot lock run folder {run_dir}: {e.strerror or e}") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed the file between our open and our lock: again
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield path
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # while still holding the lock (see above)
        os.close(fd)


class RunLog(logging.Handler):
    """A logging handler writing a run's records to ``<run_dir>/train.log`` (``time level logger: message``).

    Attach it before the run folder exists: records are held in memory until :meth:`open` names the folder,
    then written there first, in order. Records of a run whose folder never opens are dropped on
    :meth:`close`. The file is appended to (a resumed run continues it) and flushed after every record.
    """

    def __init__(self, level: int = logging.INFO):
        super().__init__(level)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self._held: list[str] = []
        self._file = None

    def open(self, run_dir: str | Path) -> Path:
        path = Path(run_dir) / "train.log"
        self.acquire()
        try:
            self._file = path.open("a", encoding="utf-8")
            self._file.writelines(self._held)
            self._file.flush()
            self._held = []
        finally:
            self.release()
        return path

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
            if self._file is None:
                self._held.append(line)
            else:
                self._file.write(line)
                self._file.flush()
        except Exception:  # a log line must never stop a run (logging's own convention)
            self.handleError(record)

    def close(self) -> None:
        self.acquire()
        try:
            if self._file is not None:
                self._file.close()
                self._file = None
            self._held = []
        finally:
            self.release()
        super().close()


def folder_size(path: str | Path) -> int:
    """Bytes of the files under ``path`` (links not followed); 0 for a missing folder."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_size
    return total


def human_size(n: int) -> str:
    """``1536`` -> ``'1.5 KB'`` (powers of 1000, as ``du --si`` and file managers show)."""
    if n < 1000:
        return f"{n} B"
    for unit in ("KB", "MB", "GB"):
        n /= 1000
        if n < 1000 or unit == "GB":
            break
    return f"{n:.1f} {unit}"


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
    # peft_config is set by peft's injection and removed by sft.model.lora.merge_lora; checking it first spares
    # importing peft for every full fine-tuning checkpoint
    if getattr(model, "peft_config", None) is None:
        return False
    from sft.model.lora import is_lora

    return is_lora(model)


def _state_dict_for_save(model) -> dict[str, torch.Tensor]:
    """What ``model.safetensors`` of a checkpoint holds: the adapter weights alone for a LoRA model (the
    frozen base is reloaded from its source at resume), else every tensor of the state dict."""
    if _has_lora(model):
        from sft.model.lora import lora_state_dict

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


def dcp_checkpoint_problem(ckpt: Path) -> str | None:
    """Why the sharded checkpoint ``ckpt`` cannot be resumed from (a file missing or unreadable), or None."""
    ckpt = Path(ckpt)
    try:
        for name in ("config.json", "state.json"):
            state = json.loads((ckpt / name).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return f"{name} is missing or unreadable ({type(e).__name__})"
    if state.get("format") != "dcp":
        return "not a sharded (DCP) checkpoint"
    if not (ckpt / "dcp" / ".metadata").is_file():
        return "dcp/.metadata is missing"
    for r in range(int(state.get("world_size", 1))):
        if not (ckpt / f"rng_rank{r}.pt").is_file():
            return f"rng_rank{r}.pt is missing"
    return None


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why ``ckpt`` cannot be resumed from (a file missing, truncated or corrupt), or ``None``.

    A sharded checkpoint (a ``dcp/`` folder, written under FSDP2) is judged by
    :func:`dcp_checkpoint_problem`; the rest of this docstring is about single-process ones.

    Cheap: reads the JSON files, the safetensors header (safetensors itself refuses a file its header
    does not exactly cover, i.e. a truncated one) and the zip directories of the ``torch.save`` files
    (stored at their end, so a truncated file has none). Does not read the tensors.
    """
    import zipfile

    from safetensors import safe_open

    ckpt = Path(ckpt)
    if (ckpt / "dcp").is_dir():  # sharded (FSDP2) checkpoint: its own layout and checks
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
        from sft.model.lora import load_lora_state_dict

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


def mark_finished(run_dir: str | Path, step: int) -> Path:
    """Write ``finished.json`` (``{"step": step}``): the run reached its end at ``step``. Called by the
    trainer once the run's end is written (last checkpoint, final eval, ``final/``); a run resumed later
    with more steps is unfinished again until it writes a newer one (see :func:`is_finished`)."""
    path = Path(run_dir) / "finished.json"
    _write_json(path, {"step": int(step), "finished_utc": datetime.now(UTC).isoformat(timespec="seconds")})
    return path


def _step_of(ckpt: Path) -> int:
    return int(_CKPT.match(ckpt.name).group(1))


def is_finished(run_dir: str | Path) -> bool:
    """True if the run reached its end at (or after) its newest checkpoint, so there is nothing to resume.

    ``finished.json`` (:func:`mark_finished`) with a step >= the newest checkpoint's says so. For runs from
    before that file: the end of a run writes its "after" samples (``samples.jsonl``, with their step) and
    ``final/`` after its last checkpoint, so either of them, as new as the newest checkpoint, says so too.
    An interrupted or ``--stop_after`` run has neither.
    """
    run_dir = Path(run_dir)
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        return False
    newest = ckpts[-1]
    step = _step_of(newest)
    marker = run_dir / "finished.json"
    if marker.is_file():
        try:
            return int(_read_json(marker).get("step", -1)) >= step
        except (OSError, ValueError, AttributeError, TypeError):
            pass  # unreadable: judge by the other signs
    samples = run_dir / "samples.jsonl"
    if samples.is_file():
        with contextlib.suppress(OSError, ValueError):
            for line in samples.read_text(encoding="utf-8").splitlines():
                row = json.loads(line) if line.strip() else {}
                if isinstance(row, dict) and row.get("stage") == "after" and int(row.get("step", -1)) >= step:
                    return True
    final_cfg = run_dir / "final" / "config.json"
    with contextlib.suppress(OSError):
        if final_cfg.is_file() and final_cfg.stat().st_mtime >= (newest / "state.json").stat().st_mtime:
            return True
    return False


def _written(ckpt: Path) -> float:
    """When ``ckpt`` was completed: the time of its ``state.json`` (written last)."""
    try:
        return (ckpt / "state.json").stat().st_mtime
    except OSError:
        return 0.0


_INPUT_NAMES = {"data": "the data", "tokenizer": "the tokenizer", "template": "the chat template"}


def _changed_parts(old: dict, new: dict, where: str = "") -> list[str]:
    """Names of the parts of one source's inputs (``sft.data.prepare.Prepared.inputs``) that differ."""
    out = [where + name for key, name in _INPUT_NAMES.items() if old.get(key) != new.get(key)]
    if old.get("max_len") != new.get("max_len"):
        out.append(f"{where}max_len {old.get('max_len')} -> {new.get('max_len')}")
    s_old, s_new = old.get("settings") or {}, new.get("settings") or {}
    out += [f"{where}setting {k}" for k in sorted(set(s_old) | set(s_new)) if s_old.get(k) != s_new.get(k)]
    return out


def changed_inputs(saved: dict, fresh: dict) -> list[str]:
    """What differs between two config.json ``data`` sections (``{"fingerprint", "inputs"}``), by name:
    ``the data``, ``the tokenizer``, ``the chat template``, ``max_len A -> B``, ``setting K`` (each prefixed
    ``source 'S': `` in a mixture, plus ``the sources`` / ``the weights`` / ``the mixing seed``); a run
    written before ``inputs`` were recorded has only its fingerprint to compare."""
    if saved.get("fingerprint") == fresh.get("fingerprint"):
        return []
    old, new = saved.get("inputs"), fresh.get("inputs") or {}
    if not old:
        return [f"the data fingerprint ({saved.get('fingerprint')} -> {fresh.get('fingerprint')})"]
    if "sources" not in old and "sources" not in new:
        out = _changed_parts(old, new)
    elif "sources" not in old or "sources" not in new:
        out = ["the sources (one source <-> a mixture)"]
    else:
        out = []
        for group in ("sources", "eval_sources"):
            a, b = old.get(group) or {}, new.get(group) or {}
            if set(a) != set(b):
                out.append(
                    f"the {group.replace('_', ' ')} ({', '.join(sorted(a))} -> {', '.join(sorted(b))})"
                )
            out += [
                p
                for name in sorted(set(a) & set(b))
                for p in _changed_parts(a[name], b[name], f"source '{name}': ")
            ]
        if old.get("weights") != new.get("weights"):
            out.append("the weights")
        if old.get("seed") != new.get("seed"):
            out.append("the mixing seed")
    return out or ["the data preparation (same inputs, another fingerprint)"]


def check_resume_inputs(run_dir: Path, fingerprint: str, inputs: dict, allow_changed: bool = False) -> None:
    """On ``--resume``: the data as prepared now must be what ``run_dir`` was trained on (its config.json).

    Raises RunError naming what changed (data file, tokenizer, template, max_len, a setting), unless
    ``allow_changed`` (``--resume_changed_data=true``), which logs a warning instead. A resumed run reads its
    rows by position (the data position of a checkpoint is its step), so other rows would be trained on."""
    saved = _read_json(Path(run_dir) / "config.json").get("data") or {}
    changed = changed_inputs(saved, {"fingerprint": fingerprint, "inputs": inputs})
    if not changed:
        return
    what = ", ".join(changed)
    if not allow_changed:
        raise RunError(
            f"cannot resume {run_dir}: {what} changed since the run started; "
            "pass --resume_changed_data=true to resume on the new inputs anyway"
        )
    log.warning("resuming %s on changed inputs (--resume_changed_data): %s", run_dir, what)


def find_resume(out_dir: str | Path, resume: str) -> tuple[Path, Path]:
    """``(run_dir, latest usable checkpoint)`` for ``--resume``.

    ``latest`` = the run in ``out_dir`` whose newest checkpoint was written last (by time, not by name),
    among the runs that have not finished (:func:`is_finished`); which one, and why, is logged. Otherwise a
    run folder path (or a name inside ``out_dir``), finished or not. Single-process and sharded (FSDP2,
    ``dcp/``) checkpoints alike; the trainer then checks the world size. A damaged checkpoint
    (:func:`checkpoint_problem`) is skipped, with a warning, for the newest intact one before it;
    RunError (naming each problem) if there is none."""
    if resume in ("latest", "true", "1"):
        root = Path(out_dir)
        with_ckpt = (
            [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and list_checkpoints(p)]
            if root.is_dir()
            else []
        )
        if not with_ckpt:
            raise RunError(f"--resume=latest: no run with a checkpoint in '{out_dir}'")
        finished = [p for p in with_ckpt if is_finished(p)]
        runs_ = sorted(
            (p for p in with_ckpt if p not in finished),
            key=lambda p: (_written(list_checkpoints(p)[-1]), p.name),
        )
        if not runs_:
            newest = max(finished, key=lambda p: _written(list_checkpoints(p)[-1]))
            raise RunError(
                f"--resume=latest: every run with a checkpoint in '{out_dir}' has finished (newest: {newest}); "
                f"to continue one, name it: --resume={newest}"
            )
        run_dir = runs_[-1]
        newest_ckpt = list_checkpoints(run_dir)[-1]
        when = datetime.fromtimestamp(_written(newest_ckpt), UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        skipped = f"; {len(finished)} finished run(s) skipped" if finished else ""
        log.info(
            "--resume=latest: %s, the unfinished run with the newest checkpoint (%s, written %s)%s",
            run_dir,
            newest_ckpt.name,
            when,
            skipped,
        )
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

    The tokenizer must already carry the training chat template. Our fast MPT (sft/model/mpt.py) is written
    with its ``save_hf``; a transformers model with ``save_pretrained``; one that refuses (GGUF-loaded) is
    first rebuilt from its config with the same weights.
    """
    out = Path(run_dir) / "final"
    tmp = Path(run_dir) / ".final.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    if hasattr(model, "forward_hidden") and not hasattr(model, "save_pretrained"):
        from sft.model import mpt

        mpt.save_hf(model, tmp)
    else:
        try:
            model.save_pretrained(str(tmp))
        except (ValueError, NotImplementedError):
            from sft.model.models import _rebuild

            _rebuild(model).save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def is_run_folder(path: str | Path) -> bool:
    """True for a run folder (what :func:`create_run_dir` makes and the trainer fills), not a model folder."""
    path = Path(path)
    if not path.is_dir() or any(path.glob("*.safetensors")):
        return False
    if (path / "metrics.jsonl").is_file() or (path / "checkpoints").is_dir() or (path / "final").is_dir():
        return True
    try:
        info = _read_json(path / "config.json")
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and isinstance(info.get("config"), dict) and "created_utc" in info


def check_not_run_folder(spec: str | Path) -> None:
    """RunError (one line) when a model was asked for and ``spec`` is a run folder: the model a run
    leaves is its ``final/`` ("did you mean <run>/final"); without one, say why there is none."""
    path = Path(str(spec)).expanduser()
    if not is_run_folder(path):
        return
    final = path / "final"
    if final.is_dir():
        raise RunError(f"{spec} is a run folder, not a model: did you mean {final}?")
    raise RunError(
        f"{spec} is a run folder with no final/ model (the run has not finished, or ran with "
        "--no-save_final); finish it with --resume, or name a model folder"
    )


def _read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))
