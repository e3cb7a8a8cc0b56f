"""Command-line option checks shared by the ``python -m sft.X`` tools and the latency / benchmark drivers.

The tools parse with :class:`OneLineParser` (a usage error is one ``error: ...`` line on stderr and exit 2,
not argparse's usage block) and give each numeric option a checked type (:func:`int_in`, :func:`float_in`,
:func:`int_list`): the range lives in the option's own definition, so a value out of range is refused while
parsing, before a model is loaded. (``sft.config.TrainConfig`` checks the trainer's fields itself.)

    p = OneLineParser(prog="python -m sft.chat")
    p.add_argument("--top_p", type=float_in(0, 1, low_open=True), default=None)
    # --top_p=5  ->  "error: argument --top_p: must be in (0, 1], got 5", exit 2
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line (``error: <message>``) and exit status 2."""

    def error(self, message):
        sys.stderr.write(f"error: {' '.join(str(message).split())}\n")
        raise SystemExit(2)


def _describe(lo, hi, low_open: bool, high_open: bool) -> str:
    if hi is None:
        return f"must be {'>' if low_open else '>='} {lo:g}"
    return f"must be in {'(' if low_open else '['}{lo:g}, {hi:g}{')' if high_open else ']'}"


def int_in(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """An argparse ``type``: an integer ``lo <= n (<= hi)``; anything else is ArgumentTypeError (one line)."""

    def parse(text: str) -> int:
        try:
            n = int(str(text).strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if n < lo or (hi is not None and n > hi):
            raise argparse.ArgumentTypeError(f"{_describe(lo, hi, False, False)}, got {n}")
        return n

    parse.__name__ = "int"
    return parse


def float_in(
    lo: float, hi: float | None = None, *, low_open: bool = False, high_open: bool = False
) -> Callable[[str], float]:
    """An argparse ``type``: a finite float in the range (``low_open`` / ``high_open`` exclude the ends)."""

    def parse(text: str) -> float:
        try:
            x = float(str(text).strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        bad = (
            not math.isfinite(x)
            or (x <= lo if low_open else x < lo)
            or (hi is not None and (x >= hi if high_open else x > hi))
        )
        if bad:
            raise argparse.ArgumentTypeError(f"{_describe(lo, hi, low_open, high_open)}, got {text}")
        return x

    parse.__name__ = "float"
    return parse


def int_list(lo: int, hi: int | None = None) -> Callable[[str], list[int]]:
    """An argparse ``type``: comma-separated integers, each ``lo <= n (<= hi)``, at least one."""
    one = int_in(lo, hi)

    def parse(text: str) -> list[int]:
        parts = [p for p in str(text).split(",") if p.strip()]
        if not parts:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
        return [one(p) for p in parts]

    parse.__name__ = "list of int"
    return parse


def config_field(name: str) -> Callable[[str], object]:
    """An argparse ``type`` for an option that is also a ``TrainConfig`` field (``--max_len``, ``--limit``,
    ``--overlong``...): the value is converted and checked by the trainer's own rule for that field
    (:func:`sft.config.parse_updates`), so the tool and the trainer accept exactly the same values."""

    def parse(text: str):
        from sft.config import ConfigError, parse_updates

        try:
            return parse_updates([f"--{name}={text}"])[name]
        except ConfigError as e:
            msg = str(e)
            prefix = f"--{name}={text}: "
            if msg.startswith(prefix):  # "--max_len=0: must be >= 8" -> "must be >= 8, got 0"
                msg = f"{msg[len(prefix) :]}, got {text}"
            raise argparse.ArgumentTypeError(msg) from None

    parse.__name__ = name
    return parse
