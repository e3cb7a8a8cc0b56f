"""Checkpoints of a run and finding where to resume: ``<run>/checkpoints/step_XXXXXXX/``, ``finished.json``.

- :func:`save_checkpoint` writes one checkpoint atomically (temporary folder + ``os.replace``: a folder named
  ``step_*`` is always complete) and keeps the newest ``keep_last``; :func:`load_checkpoint` restores the
  weights, optimizer state, RNG and counters; :func:`checkpoint_problem` says why one cannot be used;
- :func:`find_resume` turns ``--resume=latest|<run folder>|<name>`` into ``(run_dir, checkpoint)``, skipping
  finished runs (:func:`mark_finished` / :func:`is_finished`) and incomplete checkpoints;
- :func:`check_resume_inputs` refuses a resume whose data changed (:func:`changed_inputs` names what).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from datetime import UTC, datetime
from pathlib import Path

import torch

from sft.model.lora import is_lora
from sft.training.runs import RunError, _read_json, _write_json, write_failure

log = logging.getLogger(__name__)


_CKPT = re.compile(r"^step_(\d{7})$")


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _CKPT.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(_CKPT.match(p.name).group(1)))


def _state_dict_for_save(model) -> dict[str, torch.Tensor]:
    """What ``model.safetensors`` of a checkpoint holds: the adapter weights alone for a LoRA model (the
    frozen base is reloaded from its source at resume), else every tensor of the state dict."""
    if is_lora(model):
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
        cause = write_failure(e, run_dir)  # before the clean-up frees the space again
        shutil.rmtree(tmp, ignore_errors=True)
        kept = list_checkpoints(run_dir)
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
    if is_lora(model):  # adapter weights only (strict: every adapter weight, nothing else)
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


def finished_step(run_dir: str | Path) -> int | None:
    """The step ``finished.json`` records (:func:`mark_finished`), or None (no such file, unreadable)."""
    try:
        return int(_read_json(Path(run_dir) / "finished.json")["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


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
        if run_dir.parent.name == "checkpoints" or (run_dir / "state.json").is_file():
            run = run_dir.parent.parent if run_dir.parent.name == "checkpoints" else run_dir.parent
            raise RunError(
                f"--resume={resume} is a checkpoint; give its run folder: --resume={run} "
                "(the newest intact checkpoint is used)"
            )
        if run_dir.name == "final" and (run_dir.parent / "checkpoints").is_dir():
            raise RunError(
                f"--resume={resume} is a run's final/ model; give the run folder: --resume={run_dir.parent}"
            )
    ckpts = list_checkpoints(run_dir)
    finished = finished_step(run_dir)
    if not ckpts and finished is not None:
        raise RunError(
            f"--resume={resume}: {run_dir} finished at step {finished} (final/ written) and keeps no "
            "checkpoint: nothing to resume"
        )
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


def refuse_finished(run_dir: Path, resume_from: Path, saved, cfg, step: int) -> None:
    """RunError (before the run folder is touched: no lock, no train.log line, final/ and metrics.jsonl as
    they are) when ``--resume`` names a run that reached its end and the command does not lengthen it."""
    if not is_finished(run_dir):
        return
    done = finished_step(run_dir)
    done = step if done is None else done
    longer = (cfg.max_steps or 0) > done or (not cfg.max_steps and cfg.epochs > saved.epochs)
    if not longer:
        raise RunError(
            f"--resume: {run_dir} finished at step {done} (final/ written): nothing to resume, nothing "
            f"changed; to train it further give --max_steps above {done} (or a larger --epochs)"
        )


def discard(ckpt: Path) -> None:
    """Remove checkpoint folder ``ckpt`` (one nobody asked for, once ``final/`` is in place), and its
    ``checkpoints/`` parent when that is left empty."""
    shutil.rmtree(ckpt, ignore_errors=True)
    with contextlib.suppress(OSError):
        ckpt.parent.rmdir()  # only when empty
