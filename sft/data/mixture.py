"""Several data sources in one run: the ``--data`` / ``--eval_data`` grammar, per-source preparation, the mix.

Grammar (``--data`` and ``--eval_data`` alike)::

    SPEC   := '@' FILE | ENTRY (',' ENTRY)*
    ENTRY  := SOURCE (':' KEY '=' VALUE)*
    SOURCE := 'bundled' | a local .jsonl / .json / .parquet path | a hub dataset id ('owner/name')
    KEY    := weight | fmt | fields | split | limit | bad_rows

- A spec that is, whole, ``bundled`` or an existing path is one source, whatever ``,`` or ``:`` it holds
  (so ``--data=path.jsonl`` means what it always meant).
- SOURCE is the ``:``-separated parts before the first part holding ``=`` (``C:/d.jsonl:weight=2`` is
  source ``C:/d.jsonl``); every part after it must be ``KEY=VALUE``. Hub ids hold ``/`` but never ``:``.
  A path holding ``,``, or ``:`` followed by ``=``, must be named in an @FILE.
- In an inline entry, ``fields`` separates its pairs with ``;`` (``fields=prompt=q;response=a``); in an
  @FILE it is the usual ``'prompt=q,response=a'`` text or a mapping.
- @FILE: ``.json``, or ``.yaml`` / ``.yml`` (PyYAML, a dependency of ``datasets``), holding a list of
  entries (mappings with ``source`` and the keys above) or ``{"sources": [...]}``.
- An option an entry leaves out takes the run's global ``--fmt`` / ``--fields`` / ``--limit`` /
  ``--bad_rows``; ``weight`` defaults to 1.0 and ``split`` to ``train``. ``weight`` is refused in
  ``--eval_data``.
Bad specs (unknown key, weight <= 0 or not a number, a local file that does not exist, a source given
twice, an unreadable @FILE) raise a one-line ``ConfigError`` / ``DataError`` naming the source and key.

The mix (:func:`mix`): weight ``w_i`` = the fraction ``w_i / sum(w)`` of the training tokens of one epoch
drawn from source ``i``, an epoch holding as many tokens as all the sources together. A source with fewer
tokens than its share is repeated whole (in its own order) and topped up, one with more is sampled without
replacement; the top-up draws from a permutation seeded by ``(seed, i)``, so the mix is a pure function of
the seed and the prepared sources (the same after ``--resume``). One source is returned as it is. The mix
is drawn once per run; the trainer's epochs reshuffle its packed rows.

Held-out data (:func:`prepare_mixture`): without ``--eval_data`` each source gives its ``eval_size``
split, as before; with it, the eval sources are the held-out set, every training sample whose tokens equal
an eval sample's is removed from training (counted as drop ``in_eval_data``), and an eval source whose every
sample is in the training data is refused.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sft.config import ConfigError, parse_fields
from sft.data.render import Sample
from sft.data.schema import Conversation, DataError
from sft.data.sources import is_local

log = logging.getLogger(__name__)

KEYS = ("weight", "fmt", "fields", "split", "limit", "bad_rows")


@dataclass(frozen=True)
class SourceSpec:
    """One entry of a ``--data`` / ``--eval_data`` spec, its options resolved against the globals."""

    source: str
    weight: float = 1.0
    fmt: str | None = None
    fields: dict | None = field(default=None, hash=False)
    split: str = "train"
    limit: int | None = None
    bad_rows: str = "error"

    @property
    def name(self) -> str:
        """How metrics and config.json name the source: its text, plus ``:split=...`` when not train."""
        return self.source if self.split == "train" else f"{self.source}:split={self.split}"


# ----------------------------------------------------------------------------- parsing


def _read_spec_file(path: str, what: str) -> list[dict]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"{what}=@{path}: file not found")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise ConfigError(
                    f"{what}=@{path}: YAML needs PyYAML (pip install pyyaml); or use JSON"
                ) from None
            data = yaml.safe_load(text)
        elif p.suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"{what}=@{path}: expected a .json, .yaml or .yml file")
    except ConfigError:
        raise
    except Exception as e:  # json / yaml parse errors: one line
        raise ConfigError(f"{what}=@{path}: cannot parse ({str(e).splitlines()[0]})") from None
    if isinstance(data, dict) and "sources" in data:
        data = data["sources"]
    if not isinstance(data, list) or not data:
        raise ConfigError(f"{what}=@{path}: expected a non-empty list of entries (or {{'sources': [...]}})")
    out = []
    for k, e in enumerate(data, start=1):
        if isinstance(e, str):
            e = {"source": e}
        if not isinstance(e, dict) or not isinstance(e.get("source"), str) or not e["source"].strip():
            raise ConfigError(f"{what}=@{path}: entry {k} needs a 'source' (a file, hub id or 'bundled')")
        out.append(dict(e))
    return out


def _split_entry(entry: str, what: str) -> dict:
    parts = entry.split(":")
    k = next((i for i, p in enumerate(parts) if "=" in p), len(parts))
    source = ":".join(parts[:k]).strip()
    if not source:
        raise ConfigError(f"{what}: entry '{entry}' names no source")
    if ":" in source and not is_local(source):  # hub ids hold no ':'; a bare word after one is a typo
        head, _, tail = source.partition(":")
        raise ConfigError(f"{what}: source '{head}': option '{tail}' is not key=value")
    out: dict = {"source": source}
    for p in parts[k:]:
        key, eq, value = (x.strip() for x in p.partition("="))
        if not eq:
            raise ConfigError(f"{what}: source '{source}': option '{p}' is not key=value")
        out[key] = value.replace(";", ",") if key == "fields" else value
    return out


def _check_key(source: str, key: str, what: str, allowed: tuple[str, ...]) -> None:
    if key in allowed:
        return
    if key == "weight":
        raise ConfigError(f"{what}: source '{source}': option 'weight' has no meaning for a held-out source")
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else f" (have: {', '.join(allowed)})"
    raise ConfigError(f"{what}: source '{source}': unknown option '{key}'{hint}")


def _resolve(raw: dict, what: str, allowed: tuple[str, ...], defaults: dict) -> SourceSpec:
    source = str(raw.pop("source")).strip()
    kw = dict(defaults)
    for key, value in raw.items():
        _check_key(source, key, what, allowed)
        kw[key] = value
    try:
        weight = float(kw.get("weight", 1.0))
    except (TypeError, ValueError):
        raise ConfigError(
            f"{what}: source '{source}': option weight={kw['weight']} is not a number"
        ) from None
    if not np.isfinite(weight) or weight <= 0:
        raise ConfigError(f"{what}: source '{source}': option weight={kw.get('weight')} must be > 0")
    limit = kw.get("limit")
    if limit is not None:
        try:
            limit = int(limit)
        except (TypeError, ValueError):
            raise ConfigError(f"{what}: source '{source}': option limit={limit} is not an integer") from None
        if limit < 1:
            raise ConfigError(f"{what}: source '{source}': option limit={limit} must be >= 1")
    bad_rows = kw.get("bad_rows") or "error"
    if bad_rows not in ("error", "drop"):
        raise ConfigError(f"{what}: source '{source}': option bad_rows={bad_rows} must be 'error' or 'drop'")
    fields = kw.get("fields")
    if isinstance(fields, dict):
        fields = ",".join(f"{k}={v}" for k, v in fields.items())
    try:
        fields = parse_fields(fields)
    except ConfigError as e:
        raise ConfigError(f"{what}: source '{source}': option {e}".replace("--fields=", "fields=")) from None
    return SourceSpec(
        source=source,
        weight=weight,
        fmt=kw.get("fmt") or None,
        fields=fields,
        split=str(kw.get("split") or "train"),
        limit=limit,
        bad_rows=bad_rows,
    )


def parse_sources(
    text: str, *, what: str = "--data", defaults: dict | None = None, weighted: bool = True
) -> list[SourceSpec]:
    """Parse a ``--data`` (``weighted``) or ``--eval_data`` spec (see the module docstring).

    ``defaults``: the run's global ``fmt``, ``fields`` (text), ``limit``, ``bad_rows`` for options an entry
    leaves out. Checks every entry; local files must exist (``DataError`` naming the file otherwise).
    """
    text = str(text).strip()
    if not text:
        raise ConfigError(f"{what}: empty (expected a source, e.g. 'bundled' or a .jsonl file)")
    allowed = KEYS if weighted else tuple(k for k in KEYS if k != "weight")
    defaults = {k: v for k, v in (defaults or {}).items() if v is not None}
    if text.startswith("@"):
        raws = _read_spec_file(text[1:], what)
    elif text == "bundled" or Path(text).expanduser().exists():
        raws = [{"source": text}]
    else:
        raws = [_split_entry(e, what) for e in text.split(",")]
    specs = [_resolve(r, what, allowed, defaults) for r in raws]
    seen: set[tuple[str, str]] = set()
    for s in specs:
        if (s.source, s.split) in seen:
            raise ConfigError(f"{what}: source '{s.name}' is given twice")
        seen.add((s.source, s.split))
        if s.source != "bundled" and is_local(s.source) and not Path(s.source).expanduser().is_file():
            what_is = (
                "is a directory, not a data file" if Path(s.source).is_dir() else "data file does not exist"
            )
            raise DataError(what_is + ("" if what == "--data" else f" ({what})"), source=s.source)
    return specs


# ----------------------------------------------------------------------------- the mix


def mix(sources: list[list[Sample]], weights: list[float], seed: int) -> tuple[list[Sample], list[dict]]:
    """Draw one epoch's training samples from ``sources`` by token ``weights`` (see the module docstring).

    Returns ``(samples, per_source)``; ``per_source[i]`` has ``samples`` and ``tokens`` drawn, ``share``
    (of the mix's tokens) and ``passes`` (tokens drawn / tokens the source has: < 1 sampled, > 1 repeated).
    """
    if len(sources) != len(weights) or not sources:
        raise ValueError("mix: one weight per source, at least one source")
    if len(sources) == 1:
        n = sum(len(s.input_ids) for s in sources[0])
        return list(sources[0]), [{"samples": len(sources[0]), "tokens": n, "share": 1.0, "passes": 1.0}]
    have = [sum(len(s.input_ids) for s in src) for src in sources]
    total_w = float(sum(weights))
    out: list[Sample] = []
    per: list[dict] = []
    for i, (src, w) in enumerate(zip(sources, weights)):
        target = round(w / total_w * sum(have))
        got, drawn = 0, []
        while have[i] and target - got >= have[i]:  # whole passes, in the source's own order
            drawn.extend(src)
            got += have[i]
        rng = np.random.default_rng([seed, i])
        for k in rng.permutation(len(src)) if got < target else []:  # top up without replacement
            if got >= target:
                break
            drawn.append(src[int(k)])
            got += len(src[int(k)].input_ids)
        out.extend(drawn)
        per.append({"samples": len(drawn), "tokens": got, "passes": got / max(have[i], 1)})
    n_tok = sum(p["tokens"] for p in per)
    for p in per:
        p["share"] = p["tokens"] / max(n_tok, 1)
    return out, per


# ----------------------------------------------------------------------------- preparation


@dataclass
class Mixture:
    """What the trainer needs, like :class:`sft.data.prepare.Prepared`, plus the held-out samples per source."""

    train: list[Sample]
    eval: list[Sample]
    eval_conversations: list[Conversation]
    stats: dict
    fingerprint: str
    eval_by_source: dict[str, list[Sample]] = field(default_factory=dict)
    # the parts of the fingerprint, compared on --resume (sft.training.checkpoints.check_resume_inputs): one source's
    # Prepared.inputs, or {"sources": {name: inputs}, "eval_sources": {...}, "weights": {...}, "seed"}
    inputs: dict = field(default_factory=dict)


def _prepare_one(spec: SourceSpec, tokenizer, eval_size, **kw):
    from sft.data.prepare import prepare_data

    return prepare_data(
        spec.source,
        tokenizer,
        fmt=spec.fmt,
        fields=spec.fields,
        limit=spec.limit,
        bad_rows=spec.bad_rows,
        split=spec.split,
        eval_size=eval_size,
        **kw,
    )


def _round_robin(lists: list[list]) -> list:
    """Items of ``lists`` interleaved (first of each, then second of each, ...): samples from every source."""
    out = []
    for k in range(max((len(x) for x in lists), default=0)):
        out.extend(x[k] for x in lists if k < len(x))
    return out


def _source_stats(spec: SourceSpec, p, drawn: dict | None, weight_share: float | None) -> dict:
    s = p.stats
    out = {
        "source": spec.name,
        "fingerprint": p.fingerprint,
        "format": s.get("format"),
        "rows": s.get("rows"),
        "conversations": s.get("conversations"),
        "samples": s.get("train"),
        "tokens": s.get("tokens"),
        "drops": dict(s.get("drops", {})),
        "cut": s.get("cut"),
    }
    if drawn is not None:
        out.update(
            weight=spec.weight,
            target_share=weight_share,
            held_out=s.get("eval"),
            mixed_samples=drawn["samples"],
            mixed_tokens=drawn["tokens"],
            share=drawn["share"],
            passes=drawn["passes"],
        )
    return out


def prepare_mixture(
    specs: list[SourceSpec],
    tokenizer,
    *,
    eval_specs: list[SourceSpec] | None = None,
    eval_size: int | float = 0,
    seed: int = 0,
    **prepare_kw,
) -> Mixture:
    """Prepare every source on its own (``sft.data.prepare.prepare_data``, cached per source), remove the eval
    sources' samples from training, and mix (see the module docstring). ``prepare_kw``: ``template``,
    ``max_len``, ``overlong``, ``cache_dir``, ``use_cache``, passed to every ``prepare_data`` call."""
    eval_specs = list(eval_specs or [])
    kw = dict(prepare_kw, seed=seed)
    train_p = [_prepare_one(s, tokenizer, 0 if eval_specs else eval_size, **kw) for s in specs]
    if len(specs) == 1 and not eval_specs:  # one source: exactly what prepare_data gives
        p = train_p[0]
        stats = dict(p.stats, sources=[_source_stats(specs[0], p, mix([p.train], [1.0], seed)[1][0], 1.0)])
        return Mixture(
            p.train, p.eval, p.eval_conversations, stats, p.fingerprint, {specs[0].name: p.eval}, p.inputs
        )

    trains = [list(p.train) for p in train_p]
    if eval_specs:
        eval_p, eval_by_source, convs = _held_out_sources(specs, eval_specs, train_p, trains, tokenizer, kw)
    else:
        eval_p, convs = [], [p.eval_conversations for p in train_p]
        eval_by_source = {spec.name: list(p.eval) for spec, p in zip(specs, train_p)}

    samples, drawn = mix(trains, [s.weight for s in specs], seed)
    total_w = sum(s.weight for s in specs)
    evals = [s for v in eval_by_source.values() for s in v]
    drops: dict[str, int] = {}
    for p in train_p:
        for reason, n in p.stats["drops"].items():
            drops[reason] = drops.get(reason, 0) + n
    stats = {
        "mixed": True,
        "train": len(samples),
        "eval": len(evals),
        "tokens": sum(d["tokens"] for d in drawn),
        "drops": drops,
        "cut": sum(p.stats.get("cut", 0) for p in train_p),
        "sources": [_source_stats(s, p, d, s.weight / total_w) for s, p, d in zip(specs, train_p, drawn)],
        "eval_sources": [_source_stats(s, p, None, None) for s, p in zip(eval_specs, eval_p)],
        "cached": all(p.stats.get("cached") for p in train_p + eval_p),
    }
    key = [[p.fingerprint, s.weight] for s, p in zip(specs, train_p)] + [[p.fingerprint] for p in eval_p]
    fingerprint = hashlib.sha256(json.dumps([key, seed]).encode()).hexdigest()[:24]
    inputs = {
        "sources": {s.name: p.inputs for s, p in zip(specs, train_p)},
        "eval_sources": {s.name: p.inputs for s, p in zip(eval_specs, eval_p)},
        "weights": {s.name: s.weight for s in specs},
        "seed": seed,
    }
    return Mixture(samples, evals, _round_robin(convs), stats, fingerprint, eval_by_source, inputs)


def _held_out_sources(specs, eval_specs, train_p, trains, tokenizer, kw):
    """``--eval_data``: prepare each eval source whole, refuse one that training contains entirely, and remove
    its samples from ``trains`` (in place; counted as ``in_eval_data`` drops of that training source).
    Returns ``(eval_prepared, eval_by_source, held_out_conversations)``."""
    from sft.data.prepare import load_conversations

    eval_by_source: dict[str, list[Sample]] = {}
    eval_p = []
    in_train = {tuple(s.input_ids) for t in trains for s in t}
    for spec in eval_specs:
        p = _prepare_one(spec, tokenizer, 0, **kw)
        if all(tuple(s.input_ids) in in_train for s in p.train):
            raise ConfigError(
                f"--eval_data: source '{spec.name}': every one of its {len(p.train)} samples is also in "
                "the training data; name a held-out file that training does not contain"
            )
        eval_p.append(p)
        eval_by_source[spec.name] = list(p.train)
    held = {tuple(s.input_ids) for v in eval_by_source.values() for s in v}
    for k, p in enumerate(train_p):
        kept = [s for s in trains[k] if tuple(s.input_ids) not in held]
        if len(kept) < len(trains[k]):
            log.warning(
                "%s: %d samples also in --eval_data removed", specs[k].name, len(trains[k]) - len(kept)
            )
            p.stats = dict(p.stats, drops={**p.stats["drops"], "in_eval_data": len(trains[k]) - len(kept)})
        if not kept:
            raise DataError("every training sample is also in --eval_data", source=specs[k].name)
        trains[k] = kept
    convs = [
        load_conversations(
            s.source, fmt=s.fmt, fields=s.fields, limit=s.limit, split=s.split, bad_rows=s.bad_rows
        )[0]
        for s in eval_specs
    ]
    return eval_p, eval_by_source, convs
