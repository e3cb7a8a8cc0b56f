"""Data preview: ``python -m sft.preview --data=... --tokenizer=... --template=... --n=3 --max_len=2048``.

Prints the first ``n`` training samples as rendered text with the supervised spans (what the loss trains
on) marked ``⟦like this⟧`` (tool calls and reasoning as the template renders them: inside the marks; tool
results and tools: outside), then statistics: counts, drops by reason, cuts, the chat fields carried (tool
calls, tool results, reasoning, rows with tools / template kwargs) and the per-turn samples of a template
that rewrites history (conversations, extra samples, extra tokens), length percentiles,
supervised fraction, packing efficiency and preparation time (load + adapt + render + limits + checks,
then packing). A ``DataError`` (or an unusable template) prints one line on stderr and exits with 2.

``--tokenizer`` (alias ``--model``) is a ``tokenizer.json`` file, a ``.gguf`` file, or a folder / hub id.
``--no_cache`` forces a fresh preparation (to measure it); otherwise a cached result is reused.
``--data`` takes several weighted sources as the trainer does (sft/data/mixture.py); then the statistics end with
the mix: per source its weight, target and actual share of the tokens, samples, passes and drops.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from sft.argcheck import OneLineParser, config_field, int_in
from sft.config import ConfigError, error_exit
from sft.data.mixture import parse_sources, prepare_mixture
from sft.data.packing import pack, packing_efficiency
from sft.data.render import Sample, TemplateError
from sft.data.schema import IGNORE_INDEX, DataError
from sft.model.models import load_tokenizer

OPEN, CLOSE = "⟦", "⟧"


def marked_text(sample: Sample, tokenizer) -> str:
    """The sample's text with each supervised run of tokens wrapped in ``⟦ ⟧``."""
    out, run, sup = [], [], None
    for tok, lab in zip(sample.input_ids, sample.labels):
        s = lab != IGNORE_INDEX
        if sup is not None and s != sup:
            text = tokenizer.decode(run)
            out.append(OPEN + text + CLOSE if sup else text)
            run = []
        run.append(tok)
        sup = s
    if run:
        text = tokenizer.decode(run)
        out.append(OPEN + text + CLOSE if sup else text)
    return "".join(out)


def chat_lines(stats: dict) -> list[str]:
    """The chat fields carried and the per-turn samples made (``sft.data.prepare`` stats), when any."""
    lines = []
    f = stats.get("chat_fields") or {}
    if any(f.values()):
        lines.append(
            f"chat fields: tool calls {f['tool_calls']}, tool results {f['tool_results']}, reasoning "
            f"{f['reasoning']}, rows with tools/template kwargs {f['rows_with_template_kwargs']}"
        )
    t = stats.get("per_turn") or {}
    if t.get("extra_samples"):
        lines.append(
            f"per-turn samples: {t['conversations']} conversations gave {t['extra_samples']} extra samples, "
            f"{t['extra_tokens']} extra tokens (the template renders earlier turns differently)"
        )
    return lines


def mix_table(sources: list[dict]) -> str:
    """The mix, one line per source: weight, target and actual token share, samples, passes, drops."""
    lines = ["=== mix (share = fraction of the training tokens of one epoch) ==="]
    for x in sources:
        lines.append(
            f"{x['source']}: weight {x['weight']:g} -> target {100 * x['target_share']:.1f}%, "
            f"actual {100 * x['share']:.1f}% ({x['mixed_tokens']} of {x['mixed_tokens'] / x['passes']:.0f} "
            f"tokens, {x['passes']:.2f} passes, {x['mixed_samples']} samples); format {x['format']}, "
            f"rows {x['rows']}, drops {json.dumps(x['drops'])}, fingerprint {x['fingerprint']}"
        )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    """The options; each value is checked while parsing (the trainer's own rule for ``--max_len``,
    ``--limit``, ``--fmt``, ``--overlong``, ``--bad_rows``): a bad one is one ``error:`` line, exit 2."""
    p = OneLineParser(prog="python -m sft.preview", description=__doc__.splitlines()[0])
    p.add_argument(
        "--data",
        default="bundled",
        help="bundled | path to .jsonl/.json/.parquet | hub dataset id | 'SRC:weight=1,SRC2:weight=0.5' | @mix.yaml",
    )
    p.add_argument(
        "--tokenizer", "--model", dest="tokenizer", required=True, help="tokenizer.json, .gguf or folder"
    )
    p.add_argument(
        "--template", default=None, help="chatml | guanaco | a jinja string; default: the tokenizer's own"
    )
    p.add_argument("--fmt", type=config_field("fmt"), default=None, help="data format; default: detected")
    p.add_argument("--n", type=int_in(0), default=3, help="samples to print")
    p.add_argument("--max_len", type=config_field("max_len"), default=2048)
    p.add_argument("--overlong", type=config_field("overlong"), default="cut", help="cut | drop")
    p.add_argument("--bad_rows", type=config_field("bad_rows"), default="error", help="error | drop")
    p.add_argument("--limit", type=config_field("limit"), default=None)
    p.add_argument("--no_cache", action="store_true", help="prepare afresh (and do not write the cache)")
    p.add_argument(
        "--supervise",
        default="all",
        choices=["all", "once", "last"],
        help="assistant turns trained on: every one (a sample per turn where the template rewrites history), "
        "every one as the whole conversation renders it, or only each conversation's last",
    )
    return p


def _option_used(argv: list[str] | None) -> str:
    """``--model`` or ``--tokenizer``: the spelling the user gave, for messages about it."""
    args = sys.argv[1:] if argv is None else argv
    given = [a.split("=", 1)[0] for a in args if a.split("=", 1)[0] in ("--model", "--tokenizer")]
    return given[-1] if given else "--tokenizer"


def _tokenizer_for(spec: str):
    """``load_tokenizer(spec)``, plus the models' presets: a tiny preset's own tokenizer; a random-init
    shape has none (ModelError saying so)."""
    from sft.model.models import TINY_PRESETS, ModelError, tiny_tokenizer

    if spec in TINY_PRESETS:
        return tiny_tokenizer()
    if spec.startswith("random:"):
        raise ModelError(
            f"'{spec}' is a random-init model shape with no tokenizer of its own; give a tokenizer"
        )
    return load_tokenizer(spec)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        tokenizer = _tokenizer_for(args.tokenizer)
    except (OSError, ValueError) as e:  # not found offline, unreadable file, unknown name: one line, exit 2
        print(f"error: {_option_used(argv)}={args.tokenizer}: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        specs = parse_sources(
            args.data, defaults=dict(fmt=args.fmt, limit=args.limit, bad_rows=args.bad_rows)
        )
        prepared = prepare_mixture(
            specs,
            tokenizer,
            template=args.template,
            max_len=args.max_len,
            overlong=args.overlong,
            use_cache=not args.no_cache,
            supervise=args.supervise,
        )
        t_prep = time.perf_counter() - t0
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        t1 = time.perf_counter()
        rows = pack(prepared.train, args.max_len, pad)
        t_pack = time.perf_counter() - t1
        cpu = (
            time.process_time() - c0
        )  # CPU seconds of this process (all threads): robust on a shared machine
    except (DataError, TemplateError, ConfigError) as e:
        return error_exit(e)

    for i, sample in enumerate(prepared.train[: args.n]):
        print(
            f"=== sample {i} ({len(sample.input_ids)} tokens, {sample.n_supervised} supervised {OPEN}marked{CLOSE}) ==="
        )
        print(marked_text(sample, tokenizer))
        print()
    s = prepared.stats
    print("=== stats ===")
    if len(s["sources"]) > 1:
        print(f"train samples: {s['train']}, eval samples: {s['eval']}, tokens {s['tokens']}")
        print(f"drops by reason: {json.dumps(s['drops'])}; cut at a turn boundary: {s['cut']}")
        print(f"packing: {len(rows)} rows of {args.max_len}, efficiency {packing_efficiency(rows):.4f}")
        print(mix_table(s["sources"]))
        return 0
    print(
        f"source: {s['source']} (format {s['format']}), rows {s['rows']}, conversations {s['conversations']}"
    )
    print(f"train samples: {s['train']}, eval samples: {s['eval']}")
    print(f"drops by reason: {json.dumps(s['drops'])}; cut at a turn boundary: {s['cut']}")
    for line in chat_lines(s):
        print(line)
    for line in s.get("bad_row_examples", []):
        print(f"  dropped: {line}")
    pct = s["length_percentiles"]
    print(
        f"length (tokens): p50 {pct['p50']}, p90 {pct['p90']}, p99 {pct['p99']}, max {pct['max']}; total {s['tokens']}"
    )
    print(f"supervised fraction: {s['supervised_fraction']:.3f} ({s['supervised_tokens']} tokens)")
    print(f"packing: {len(rows)} rows of {args.max_len}, efficiency {packing_efficiency(rows):.4f}")
    if s.get("cached"):
        print(f"preparation: cached ({t_prep:.2f} s to load; {s['prep_seconds']:.2f} s when first prepared)")
    print(
        f"preparation time: {t_prep:.2f} s (load+render+limits+checks) + {t_pack:.2f} s (pack) = {t_prep + t_pack:.2f} s wall, {cpu:.2f} s CPU"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
