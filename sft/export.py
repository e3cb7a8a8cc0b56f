"""Export a fine-tuned model to GGUF (llama.cpp, Ollama, LM Studio): the command line over sft/model/gguf.py.

    python -m sft.export RUN_OR_FINAL_DIR --gguf=f16|bf16|q8_0 [--out FILE] [--force]

What goes into the file, and what is refused, is :func:`sft.model.gguf.export_gguf`'s contract. A failure is one
line ``error: ...`` and exit status 2; nothing partial is left.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from sft.argcheck import OneLineParser
from sft.config import error_exit
from sft.model.gguf import ExportError, export_gguf

__all__ = ["ExportError", "export_gguf", "main"]


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="python -m sft.export", description="Export a run's final/ model to one GGUF file."
    )
    p.add_argument(
        "path", metavar="RUN_OR_FINAL_DIR", help="a run folder (its final/ is used) or a model folder"
    )
    p.add_argument("--gguf", required=True, metavar="TYPE", help="f16 | bf16 | q8_0")
    p.add_argument("--out", default=None, help="output file (default: <final>/model-<TYPE>.gguf)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error already printed as one line (2)
        return int(e.code or 0)
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s", stream=sys.stderr)
    t0 = time.perf_counter()
    try:
        path = export_gguf(args.path, args.gguf, out=args.out, force=args.force)
    except ExportError as e:
        return error_exit(e)
    size = path.stat().st_size
    print(f"wrote {path} ({size / 1e6:.1f} MB, {args.gguf.lower()}) in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
