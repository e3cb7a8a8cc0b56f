"""The console: logging set-up for scripts, the fixed step line, the metrics writer of ranks other than 0, and
the stop handlers (SIGTERM / Ctrl-C finish the step, checkpoint and stop).

Contract: the run's own records (loggers ``sft.*``, ``inf_tests.*``, ``__main__``) at INFO and above go to
stderr, one stream (the step lines included: they are log records, written beside the progress bar by
:func:`console_beside_bar`, and so also in ``train.log``); other packages' records below ERROR go only to
the run's ``train.log``. Nothing of a run goes to stdout.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys

import torch


def setup_logging() -> None:
    """Console logging for scripts: the run's own lines (INFO) on stderr, one stream, so ``> log 2>&1``
    (or ``2> log``) captures them all; other packages' warnings off the console.

    Python warnings are routed into logging (``logging.captureWarnings``) and, like other packages'
    log records below ERROR, kept off the console: they reach the run's ``train.log`` (:class:`sft.training.runs.RunLog`,
    attached by :func:`train`). transformers' progress bars (loading and writing weights) are off."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
        for handler in logging.getLogger().handlers:
            handler.addFilter(_own_records)
    logging.captureWarnings(True)
    for noisy in ("httpx", "huggingface_hub", "transformers", "datasets", "matplotlib", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    with contextlib.suppress(ImportError):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


@contextlib.contextmanager
def console_beside_bar(tqdm_class):
    """While a tqdm bar is on screen: the console handlers of the root logger (stderr / stdout streams) write
    through ``tqdm_class.write`` into their own stream, so a log line never breaks the bar and every line
    (the step lines included) goes through logging: to the console as :func:`setup_logging` set it up, and
    to the run's ``train.log``. Their filters stay (unlike ``tqdm.contrib.logging``, which drops them)."""
    root = logging.getLogger()
    patched = []
    for h in root.handlers:
        if type(h) is logging.StreamHandler and h.stream in (sys.stderr, sys.stdout):

            def emit(record, h=h):
                try:
                    tqdm_class.write(h.format(record), file=h.stream)
                    h.flush()
                except Exception:  # as logging.StreamHandler.emit does
                    h.handleError(record)

            h.emit = emit
            patched.append(h)
    try:
        yield
    finally:
        for h in patched:
            del h.emit  # the class's own emit again


OWN_LOGGERS = ("sft", "inf_tests", "__main__", "root")


def _own_records(record: logging.LogRecord) -> bool:
    """Console filter: this project's records, and errors of anyone; the rest goes to the run's log only."""
    return record.name.split(".")[0] in OWN_LOGGERS or record.levelno >= logging.ERROR


def step_line(step, total, loss, lr, dt, tok_s, mfu, mem) -> str:
    """The fixed-format console line: ``step | loss | lr | dt | tok/s | MFU | mem``."""
    mfu_s = f"{100 * mfu:5.1f}%" if mfu is not None else "    -"
    mem_s = f"{mem:6.2f} GiB" if mem is not None else "     - GiB"
    return (
        f"step {step:>6}/{total} | loss {loss:8.4f} | lr {lr:.3e} | dt {dt * 1000:8.1f} ms | "
        f"tok/s {tok_s:9.0f} | MFU {mfu_s} | mem {mem_s}"
    )


class NoWriter:
    """Stands in for :class:`sft.training.runs.MetricsWriter` on ranks other than 0 (they write nothing)."""

    def train(self, row) -> None:
        pass

    def eval(self, row) -> None:
        pass

    def close(self) -> None:
        pass


def out_of_memory(e: BaseException) -> str | None:
    """A few words on an allocation failure (CUDA or CPU), or None if ``e`` is something else."""
    text = " ".join(str(e).split())
    if isinstance(e, MemoryError) or isinstance(e, getattr(torch, "OutOfMemoryError", ())):
        return text[:160] or type(e).__name__
    if "can't allocate memory" in text or "out of memory" in text.lower():
        return text[:160]
    return None


def install_stop_handlers(flag: dict) -> dict:
    """SIGTERM and SIGINT set ``flag["signal"]``; the loop checkpoints and stops after the current step."""
    previous = {}

    def handler(signum, frame):
        if flag.get("signal"):  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        flag["signal"] = signal.Signals(signum).name
        logging.getLogger("sft").warning(
            "%s received: finishing this step, saving a checkpoint, then stopping", flag["signal"]
        )

    for s in (signal.SIGTERM, signal.SIGINT):
        try:
            previous[s] = signal.signal(s, handler)
        except ValueError:  # not in the main thread
            pass
    return previous
