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

from sft.config import run_name_problem

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
    why = run_name_problem(name)
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


@contextlib.contextmanager
def run_logging(is_main: bool) -> Iterator[RunLog]:
    """The run's logging, restored afterwards: one console (rank 0's; warnings still show on every rank), the
    ``sft`` records at INFO whoever calls (train.log gets the run's lines), and a :class:`RunLog` on the root
    logger (yielded: ``open`` it once the run folder exists)."""
    sft_log = logging.getLogger("sft")
    level = sft_log.level
    if not is_main:
        sft_log.setLevel(logging.WARNING)
    elif sft_log.getEffectiveLevel() > logging.INFO:
        sft_log.setLevel(logging.INFO)
    run_log = RunLog()
    logging.getLogger().addHandler(run_log)
    try:
        yield run_log
    finally:
        logging.getLogger().removeHandler(run_log)
        run_log.close()
        sft_log.setLevel(level)


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


def write_config(run_dir: Path, cfg_dict: dict, *, prepared, model, device: str) -> dict:
    """Write ``config.json``: the resolved config, the prepared data's fingerprint, inputs and statistics, the
    model's class, parameter counts and dtype, ``device`` (its name) and provenance; returns what was written."""
    data = {"fingerprint": prepared.fingerprint, "inputs": prepared.inputs, "stats": prepared.stats}
    model = {
        "class": type(model).__name__,
        "n_params": sum(p.numel() for p in model.parameters()),
        "n_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "dtype": str(next(model.parameters()).dtype),
    }
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


def train_row(state: dict, epoch: float, res, lr: float, mfu: tuple, peak_mem_gib: float | None) -> dict:
    """The train line of ``metrics.jsonl`` (:data:`TRAIN_KEYS`, in order) after a step: ``res`` the engine's
    StepResult, ``state`` the run's running totals (step already counted), ``mfu`` = (on processed tokens,
    on non-pad tokens)."""
    values = (
        state["step"], epoch, res.loss, lr, res.grad_norm, res.processed, res.nonpad, res.n_supervised,
        state["tokens_processed"], state["tokens_nonpad"], state["tokens_supervised"], res.processed / res.dt,
        *mfu, peak_mem_gib, res.dt,
    )  # fmt: skip
    return dict(zip(TRAIN_KEYS, values, strict=True))


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


def truncate_metrics(run_dir: Path, step: int, *, at_end: bool = False) -> None:
    """Drop metric lines after ``step`` (a resumed run rewrites them; no duplicates). ``at_end``: the
    checkpoint is the run's last step, whose held-out evaluation comes after it (the run's finish, which
    the resumed run does again): its eval line at ``step`` goes too."""
    rows = [
        r
        for r in read_metrics(run_dir)
        if r.get("step", 0) < step or (r.get("step", 0) == step and not (at_end and "eval_loss" in r))
    ]
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


def write_failure(e: BaseException, where: str | Path) -> str:
    """The cause of a failed write, in a few words: ``no space left on <where>`` for a full disk (ENOSPC, and
    torch's ``unexpected pos`` / ``file write failed``, which is how ``torch.save`` reports a short write),
    ``disk quota exceeded on <where>``, else the error's own first line."""
    text = " ".join(str(e).split()) or type(e).__name__
    code = getattr(e, "errno", None)
    if (
        code == errno.ENOSPC
        or "No space left" in text
        or (isinstance(e, RuntimeError) and ("unexpected pos" in text or "file write failed" in text))
    ):
        return f"no space left on {where}"
    if code == errno.EDQUOT or "quota exceeded" in text.lower():
        return f"disk quota exceeded on {where}"
    return (getattr(e, "strerror", None) or text)[:300]


def save_final(run_dir: Path, model, tokenizer, notes: dict[str, Any] | None = None) -> Path:
    """Write ``final/`` in Hugging Face format (safetensors, config, tokenizer), and each of ``notes``
    (file name -> JSON object, e.g. ``keep_best.json``: which step it holds) beside them; returns its path.

    The tokenizer must already carry the training chat template. Our fast MPT (sft/model/mpt.py) is written
    with its ``save_hf``; a transformers model with ``save_pretrained``; one that refuses (GGUF-loaded) is
    first rebuilt from its config with the same weights.

    Written into ``.final.tmp/`` and swapped in only once complete: a failure (full disk, quota, Ctrl-C)
    removes the temporary folder and leaves the previous ``final/`` (if any) as it was; it raises RunError
    naming the cause (``no space left on <run folder>``), or lets KeyboardInterrupt through.
    """
    out = Path(run_dir) / "final"
    tmp = Path(run_dir) / ".final.tmp"
    old = Path(run_dir) / ".final.old"
    try:
        for leftover in (tmp, old):
            if leftover.exists():
                shutil.rmtree(leftover)
        from sft.model.lora import save_merged  # our MPT, transformers, or GGUF-loaded: one writer

        save_merged(model, tmp)
        tokenizer.save_pretrained(str(tmp))
        for name, obj in (notes or {}).items():
            _write_json(tmp / name, obj)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError | RuntimeError):
            kept = "the previous final/ is intact" if out.is_dir() else "no final/ written"
            raise RunError(f"could not write {out} ({write_failure(e, run_dir)}); {kept}") from None
        raise
    if out.exists():  # the swap: the old final/ is removed only once the new one is in place
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
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


def export_final_gguf(run_dir: Path, qtype: str) -> None:
    """``--export_gguf``: final/ as one GGUF file; a failure is one RunError line (the run stays finished)."""
    from sft.model.gguf import ExportError, export_gguf

    try:
        gguf = export_gguf(run_dir / "final", qtype, force=True)
    except ExportError as e:
        raise RunError(
            f"the run finished ({run_dir}) but its GGUF export failed: {e}; export by hand with "
            f"python -m sft.export {run_dir} --gguf=<type>"
        ) from None
    log.info("GGUF: %s (%s)", gguf, human_size(gguf.stat().st_size))


def log_run_size(run_dir: Path) -> None:
    """One line: the run folder's size on disk, with its big parts (what a user may want to delete)."""
    parts = [
        f"{p.name}/ {human_size(folder_size(p))}"
        for p in (run_dir / "final", run_dir / "checkpoints", run_dir / "adapter")
        if p.is_dir()
    ]
    total = human_size(folder_size(run_dir))
    log.info("run folder size: %s%s", total, f" ({', '.join(parts)})" if parts else "")
