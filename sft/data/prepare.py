"""Data preparation: source -> conversations -> held-out split -> samples, with limits, checks and a cache.

``prepare_data`` runs, in order:

1. load rows (``sft.data.sources.load_rows``) and adapt them (``sft.data.formats.to_conversation``), in
   :func:`load_conversations`; the format
   is detected on the first row and then required of every row. A bad row raises ``DataError``
   (``bad_rows="error"``, the default) or is dropped and counted (``bad_rows="drop"``);
2. split a held-out set off the conversations (seeded, deterministic, before any rendering);
3. render (``sft.data.render.render_samples``) with the template: one sample per conversation, or more for
   a template that rewrites history (``stats["per_turn"]`` counts the conversations, extra samples and
   extra tokens); ``supervise`` picks every assistant turn (``"all"``; ``"once"``: as the whole
   conversation renders them, no extra samples) or only the last (``"last"``). A row
   whose fields the template ignores or refuses raises ``DataError`` naming the row (or is dropped, counted
   as ``bad_row``, with ``bad_rows="drop"``);
4. limits: a sample over ``max_len`` tokens is cut after the last assistant reply that fits
   (``overlong="cut"``) or dropped (``overlong="drop"``; with ``supervise="last"`` an over-long sample is
   dropped too: a cut would supervise another turn); a sample with no supervised token is dropped.
   Every drop is counted by reason in ``stats["drops"]``; cuts in ``stats["cut"]``;
5. validate: refuses (``DataError``) a template that puts no end-of-turn marker after a reply, and, naming
   the row, a sample with an empty mask, an end-of-turn token left unsupervised, a reply not closed by
   its end-of-turn token (when that marker is one token), or a doubled BOS;
6. statistics (lengths, supervised fraction, packing efficiency at ``max_len``, preparation time).

The result is cached on disk (``cache_dir``, else ``$SFT_CACHE``, else ``~/.cache/sft``) under a
fingerprint of the data (file bytes, bundled sample, or hub id + split), the tokenizer (its full JSON
and special tokens), the resolved template and every setting, so a re-run skips all of the above.
The cache file (``prepared-<fingerprint>.npz``) holds only integer arrays and one JSON document, read
with ``np.load(allow_pickle=False)``: nothing in it can execute code, whoever wrote it. A cache file that
cannot be read back (truncated, corrupt, a pickle, another fingerprint's) is ignored with a warning and
rewritten.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sft.data.formats import detect_format, to_conversation
from sft.data.packing import best_fit_decreasing
from sft.data.render import (
    SUPERVISE,
    Sample,
    bos_to_add,
    end_of_turn_text,
    render_samples,
    resolve_template,
    stop_token_ids,
)
from sft.data.schema import IGNORE_INDEX, REASONING, TEMPLATE_KWARGS, Conversation, DataError
from sft.data.sources import is_local, load_rows

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # bump when preparation changes what it produces (2: chat fields kept, per-turn samples)


@dataclass
class Prepared:
    """Prepared data: rendered train/eval samples, the raw held-out conversations, stats, fingerprint."""

    train: list[Sample]
    eval: list[Sample]
    eval_conversations: list[Conversation]
    stats: dict = field(default_factory=dict)
    fingerprint: str = ""
    # what the fingerprint is made of, by part (data, tokenizer, template, max_len, settings): a run records
    # it so that --resume can name what changed (sft.training.checkpoints.check_resume_inputs)
    inputs: dict = field(default_factory=dict)


def _data_key(source: str, split: str) -> str:
    if source == "bundled":
        from sft.data.sample_data import BUNDLED

        return "bundled:" + hashlib.sha256(json.dumps(BUNDLED, sort_keys=True).encode()).hexdigest()
    if is_local(source) and Path(source).is_file():
        h = hashlib.sha256()
        with open(source, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return "file:" + h.hexdigest()
    return f"hub:{source}:{split}"


def _tokenizer_key(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    special = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, bos_to_add(tokenizer)]
    return hashlib.sha256((body + json.dumps(special)).encode()).hexdigest()


def _fingerprint(source, split, tokenizer, template_src, settings) -> tuple[str, dict]:
    """``(fingerprint, inputs)``: the cache key, and its parts as a run records them."""
    data, tok = _data_key(source, split), _tokenizer_key(tokenizer)
    payload = json.dumps(
        {"v": CACHE_VERSION, "data": data, "tok": tok, "template": template_src, "settings": settings},
        sort_keys=True,
    )
    inputs = {
        "data": data,
        "tokenizer": tok,
        "template": hashlib.sha256(template_src.encode()).hexdigest(),
        "max_len": settings["max_len"],
        "settings": {k: v for k, v in settings.items() if k != "max_len"},
    }
    return hashlib.sha256(payload.encode()).hexdigest()[:24], inputs


def _save_cache(prepared: Prepared, path: Path) -> None:
    """Write ``prepared`` as an ``.npz``: per split ``<split>_lengths`` / ``_input_ids`` / ``_labels`` (int64,
    the samples concatenated) and ``meta`` (UTF-8 JSON bytes: fingerprint, stats, held-out conversations)."""
    arrays = {}
    for name, samples in (("train", prepared.train), ("eval", prepared.eval)):
        arrays[f"{name}_lengths"] = np.array([len(s.input_ids) for s in samples], dtype=np.int64)
        for key in ("input_ids", "labels"):
            parts = [np.asarray(getattr(s, key), dtype=np.int64) for s in samples]
            arrays[f"{name}_{key}"] = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    meta = {
        "fingerprint": prepared.fingerprint,
        "stats": prepared.stats,
        "eval_conversations": prepared.eval_conversations,
    }
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as f:
        np.savez(f, **arrays)
    tmp.replace(path)  # atomic: a concurrent reader never sees half a file


def _load_cache(path: Path, fingerprint: str) -> Prepared:
    """Read what :func:`_save_cache` wrote; raises (ValueError, OSError, ...) on anything else."""
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(z["meta"].tobytes().decode())
        if meta["fingerprint"] != fingerprint:
            raise ValueError(f"holds fingerprint {meta['fingerprint']!r}")
        splits = {}
        for name in ("train", "eval"):
            lengths, ids, labels = (z[f"{name}_{k}"] for k in ("lengths", "input_ids", "labels"))
            if len(ids) != len(labels) or int(lengths.sum()) != len(ids) or (lengths < 0).any():
                raise ValueError(f"{name} arrays disagree in length")
            cuts = np.cumsum(lengths)[:-1]
            splits[name] = [
                Sample(a.tolist(), b.tolist()) for a, b in zip(np.split(ids, cuts), np.split(labels, cuts))
            ][: len(lengths)]
    return Prepared(splits["train"], splits["eval"], meta["eval_conversations"], meta["stats"], fingerprint)


def default_cache_dir() -> Path:
    return Path(os.environ.get("SFT_CACHE", Path.home() / ".cache" / "sft"))


def _runs(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and end (exclusive) of each maximal run of supervised labels."""
    sup = (labels != IGNORE_INDEX).astype(np.int8)
    d = np.diff(np.concatenate([[0], sup, [0]]))
    return np.flatnonzero(d == 1), np.flatnonzero(d == -1)


def validate_sample(
    sample: Sample, *, bos_id: int | None, stop_ids: list[int], marker_id: int | None
) -> str | None:
    """Why ``sample`` must not be trained on, or ``None``. See the module docstring, step 5."""
    ids = np.asarray(sample.input_ids)
    labels = np.asarray(sample.labels)
    if len(ids) != len(labels):
        return "input_ids and labels differ in length"
    starts, ends = _runs(labels)
    if len(starts) == 0:
        return "empty mask: no supervised token"
    if bos_id is not None and len(ids) >= 2 and ids[0] == bos_id and ids[1] == bos_id:
        return f"doubled BOS (id {bos_id}) at the start"
    nxt = ends[ends < len(ids)]
    if len(nxt) and np.isin(ids[nxt], stop_ids).any():
        return (
            "an end-of-turn token right after a reply is unsupervised (the model would never learn to stop)"
        )
    if marker_id is not None and (ids[ends - 1] != marker_id).any():
        return f"a supervised reply does not end with the end-of-turn token (id {marker_id})"
    return None


def chat_field_counts(convs: list[Conversation]) -> dict[str, int]:
    """How many messages carry each chat field, and how many rows carry template keyword arguments."""
    out = {"tool_calls": 0, "tool_results": 0, "reasoning": 0, "rows_with_template_kwargs": 0}
    for conv in convs:
        out["rows_with_template_kwargs"] += bool(conv and TEMPLATE_KWARGS in conv[0])
        for m in conv:
            out["tool_calls"] += "tool_calls" in m
            out["tool_results"] += m.get("role") == "tool"
            out["reasoning"] += REASONING in m
    return out


def _n_eval(eval_size: int | float, n: int) -> int:
    if isinstance(eval_size, float) and not eval_size.is_integer() or 0 < eval_size < 1:
        if not 0 <= eval_size < 1:
            raise ValueError(f"eval_size fraction must be in [0, 1), got {eval_size}")
        return int(round(eval_size * n))
    k = int(eval_size)
    if k < 0 or k >= n:
        raise DataError(f"eval_size={k} leaves no training conversation out of {n}")
    return k


def load_conversations(
    source: str,
    *,
    fmt: str | None = None,
    fields: dict | None = None,
    limit: int | None = None,
    split: str = "train",
    bad_rows: str = "error",
) -> tuple[list[Conversation], list[int], str | None, int, dict[str, int], list[str]]:
    """Step 1 of :func:`prepare_data`: rows of ``source`` adapted to conversations.

    Returns ``(conversations, row_numbers, fmt, n_rows, drops, bad_row_examples)``: ``fmt`` is the format
    given or detected on the first row; a bad row raises ``DataError`` (``bad_rows="error"``) or is dropped
    and counted in ``drops["bad_row"]``. No usable conversation at all is a ``DataError`` naming the source.
    """
    source = str(source)
    drops: dict[str, int] = {}
    bad_examples: list[str] = []
    convs: list[Conversation] = []
    row_ids: list[int] = []
    n_rows = 0
    for i, row in load_rows(source, limit=limit, split=split):
        n_rows += 1
        try:
            if fmt is None:
                fmt = detect_format(row, fields) if isinstance(row, dict) else None
            conv = to_conversation(row, fmt, source=source, row_index=i, fields=fields)
        except DataError as e:
            if e.source is None:
                e = DataError(e.reason, source=source, row=i, field=e.field)
            if bad_rows == "error":
                raise e from None
            drops["bad_row"] = drops.get("bad_row", 0) + 1
            if len(bad_examples) < 5:
                bad_examples.append(str(e))
            log.warning("dropped: %s", e)
            continue
        convs.append(conv)
        row_ids.append(i)
    if not convs:
        raise DataError(f"no usable conversation in {n_rows} rows (drops: {drops})", source=source)
    return convs, row_ids, fmt, n_rows, drops, bad_examples


def prepare_data(
    source: str,
    tokenizer,
    *,
    template: str | None = None,
    fmt: str | None = None,
    fields: dict | None = None,
    max_len: int = 2048,
    overlong: str = "cut",
    limit: int | None = None,
    eval_size: int | float = 0,
    seed: int = 0,
    cache_dir: Path | str | None = None,
    bad_rows: str = "error",
    split: str = "train",
    use_cache: bool = True,
    supervise: str = "all",
) -> Prepared:
    """Prepare ``source`` for training with ``tokenizer`` and ``template`` (see the module docstring).

    ``eval_size``: a count, or a fraction in (0, 1) of the conversations, held out before rendering.
    ``supervise``: ``"all"`` assistant turns (default), ``"once"`` (each as the whole conversation renders it:
    one sample per conversation) or only the ``"last"`` of each conversation (``sft.data.render.SUPERVISE``).
    Returns ``Prepared``; ``stats`` has ``drops`` (reason -> count), ``cut``, lengths, ``prep_seconds``.
    """
    _check_choices(overlong, bad_rows, supervise)
    t0 = time.perf_counter()
    source = str(source)
    tmpl = resolve_template(tokenizer, template)
    settings = dict(
        fmt=fmt, fields=fields, max_len=max_len, overlong=overlong, limit=limit, eval_size=eval_size, seed=seed,
        bad_rows=bad_rows,
    )  # fmt: skip
    if supervise != "all":  # only when set: the default keeps the fingerprints' settings as they were
        settings["supervise"] = supervise
    fingerprint, inputs = _fingerprint(source, split, tokenizer, tmpl, settings)
    cache_file = Path(cache_dir or default_cache_dir()) / f"prepared-{fingerprint}.npz"
    if use_cache and (hit := _read_cache(cache_file, fingerprint, inputs, t0)) is not None:
        return hit

    convs, row_ids, fmt, n_rows, drops, bad_examples = load_conversations(  # step 1
        source, fmt=fmt, fields=fields, limit=limit, split=split, bad_rows=bad_rows
    )
    eval_idx, train_idx = _split(len(convs), eval_size, seed)  # step 2
    rendered, alive = _render_rows(  # step 3
        convs, row_ids, n_rows, tokenizer, tmpl, max_len, supervise, source, bad_rows, drops, bad_examples
    )
    check = _sample_check(tokenizer, tmpl, source)  # step 5's settings: refuses a template with no marker
    kept, n_cut = _fit_rows(  # steps 4 and 5
        rendered, alive, convs, row_ids, tokenizer, tmpl, max_len, overlong, supervise, drops, check, source
    )
    train = [s for k in train_idx for s in kept.get(k, [])]
    evals = [s for k in eval_idx for s in kept.get(k, [])]
    if not train:
        raise DataError(f"no training sample left after filtering (drops: {drops})", source=source)

    stats = {  # step 6
        "source": source,
        "format": fmt,
        "rows": n_rows,
        "conversations": len(convs),
        "train": len(train),
        "eval": len(evals),
        "drops": drops,
        "bad_row_examples": bad_examples,
        "cut": n_cut,
        **_length_stats(train, max_len),
        "per_turn": _per_turn(rendered, alive, convs),
        "chat_fields": chat_field_counts([convs[k] for k in alive]),
        "cached": False,
    }
    stats["prep_seconds"] = round(time.perf_counter() - t0, 3)
    alive_set = set(alive)
    prepared = Prepared(
        train, evals, [convs[k] for k in eval_idx if k in alive_set], stats, fingerprint, inputs
    )
    if use_cache:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            _save_cache(prepared, cache_file)
        except OSError as e:  # a read-only home must not stop training
            log.warning("could not write the data cache %s: %s", cache_file, e)
    return prepared


def _check_choices(overlong: str, bad_rows: str, supervise: str) -> None:
    if overlong not in ("cut", "drop"):
        raise ValueError(f"overlong must be 'cut' or 'drop', got {overlong!r}")
    if bad_rows not in ("error", "drop"):
        raise ValueError(f"bad_rows must be 'error' or 'drop', got {bad_rows!r}")
    if supervise not in SUPERVISE:
        raise ValueError(f"supervise must be one of {SUPERVISE}, got {supervise!r}")


def _read_cache(cache_file: Path, fingerprint: str, inputs: dict, t0: float) -> Prepared | None:
    """The cached preparation of ``fingerprint``, or ``None`` when there is none or it cannot be read."""
    if not cache_file.is_file():
        return None
    try:
        prepared = _load_cache(cache_file, fingerprint)
    except Exception as e:  # truncated or corrupt (a kill mid-write, a full disk), not ours: rebuild it
        log.warning(
            "ignoring unreadable data cache %s (%s: %s); preparing again", cache_file, type(e).__name__, e
        )
        return None
    prepared.inputs = inputs
    prepared.stats["cached"] = True
    prepared.stats["load_seconds"] = round(time.perf_counter() - t0, 3)
    log.info("prepared data from cache %s", cache_file)
    return prepared


def _split(n: int, eval_size: int | float, seed: int) -> tuple[list[int], list[int]]:
    """Step 2: ``(eval_idx, train_idx)``, ascending indices of the conversations, deterministic in ``seed``."""
    n_eval = _n_eval(eval_size, n)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    eval_idx = sorted(order[:n_eval])
    eval_set = set(eval_idx)
    return eval_idx, [k for k in range(n) if k not in eval_set]


def _render_rows(
    convs, row_ids, n_rows, tokenizer, tmpl, max_len, supervise, source, bad_rows, drops, bad_examples
):
    """Step 3: ``(rendered, alive)``: the rendered samples and the indices of the conversations they render
    (``rendered[j].conversation`` indexes ``alive``). A row the template ignores or refuses raises, or with
    ``bad_rows="drop"`` is dropped, counted in ``drops`` and ``bad_examples``, and the rest rendered again.
    ``max_len`` lets the renderer skip tokenizing a row whole when it cannot fit."""
    alive = list(range(len(convs)))
    while True:
        try:
            rendered = render_samples(
                [convs[k] for k in alive], tokenizer, tmpl, max_len=max_len, supervise=supervise
            )
        except DataError as e:
            if getattr(e, "index", None) is None:
                raise
            k = alive[e.index]  # a row whose fields the template ignores or refuses
            err = DataError(e.reason, source=source, row=row_ids[k], field=e.field)
            if bad_rows == "error":
                raise err from None
            drops["bad_row"] = drops.get("bad_row", 0) + 1
            if len(bad_examples) < 5:
                bad_examples.append(str(err))
            log.warning("dropped: %s", err)
            alive.remove(k)
            if not alive:
                raise DataError(
                    f"no usable conversation in {n_rows} rows (drops: {drops})", source=source
                ) from None
            continue
        return rendered, alive


def _sample_check(tokenizer, tmpl: str, source: str) -> dict:
    """Step 5's settings for :func:`validate_sample`; refuses a template that closes a reply with no
    end-of-turn marker."""
    stop_ids = stop_token_ids(tokenizer, tmpl)
    marker = end_of_turn_text(tokenizer, tmpl)
    if not marker:
        raise DataError(
            "refusing to train: the template closes an assistant reply with no end-of-turn marker "
            "(the model would never learn to stop)",
            source=source,
        )
    marker_ids = tokenizer(marker, add_special_tokens=False)["input_ids"]
    return {
        "bos_id": tokenizer.bos_token_id,
        "stop_ids": stop_ids,
        "marker_id": marker_ids[0] if len(marker_ids) == 1 else None,
    }


def _per_turn(rendered, alive: list[int], convs: list[Conversation]) -> dict[str, int]:
    """What per-turn samples (a template that rewrites history) cost over rendering each row once."""
    n_pieces: dict[int, int] = {}
    extra_tokens = 0
    for r in rendered:
        k = alive[r.conversation]
        n_pieces[k] = n_pieces.get(k, 0) + 1
        if r.n_messages < len(convs[k]):
            extra_tokens += len(r.sample)
    return {
        "conversations": sum(v > 1 for v in n_pieces.values()),
        "extra_samples": sum(v - 1 for v in n_pieces.values()),
        "extra_tokens": extra_tokens,
    }


def _fit_rows(
    rendered, alive, convs, row_ids, tokenizer, tmpl, max_len, overlong, supervise, drops, check, source
):
    """Steps 4 and 5: ``(kept, n_cut)``, the samples kept by conversation index and how many were cut to fit.
    Drops are counted by reason in ``drops``; a sample that fails :func:`validate_sample` raises, naming its row."""
    n_cut = 0
    kept: dict[int, list[Sample]] = {}
    for r in rendered:
        k, s = alive[r.conversation], r.sample
        if len(s.input_ids) > max_len:
            s, why = _cut_to_fit(r, convs[k], tokenizer, tmpl, max_len, overlong, supervise)
            if s is None:
                drops[why] = drops.get(why, 0) + 1
                continue
            n_cut += 1
        if all(x == IGNORE_INDEX for x in s.labels):
            drops["no_supervised_tokens"] = drops.get("no_supervised_tokens", 0) + 1
            continue
        why = validate_sample(s, **check)
        if why is not None:
            raise DataError(f"refusing to train: {why}", source=source, row=row_ids[k])
        kept.setdefault(k, []).append(s)
    return kept, n_cut


def _cut_to_fit(r, conv, tokenizer, tmpl, max_len, overlong, supervise) -> tuple[Sample | None, str | None]:
    """An over-long rendered sample ``r`` cut after its last reply that fits, re-rendered so its tokens are
    exact: ``(sample, None)``, or ``(None, drop reason)`` where it is dropped instead (step 4)."""
    fitting = [j for j, c in enumerate(r.cuts) if c <= max_len]
    if overlong == "drop" or not fitting or supervise == "last":
        return None, "overlong" if overlong == "drop" or supervise == "last" else "overlong_first_reply"
    for j in reversed(fitting):
        turn = r.turns[j]
        (rr,) = render_samples(
            [conv[: turn + 1]], tokenizer, tmpl, supervise=supervise, only=[r.turns[: j + 1]]
        )
        if len(rr.sample.input_ids) <= max_len:
            return rr.sample, None
    return None, "overlong_first_reply"


def _length_stats(train: list[Sample], max_len: int) -> dict:
    """Step 6: token counts, length percentiles and best-fit packing efficiency of the training samples."""
    lengths = np.array([len(s.input_ids) for s in train])
    n_sup = int(sum(s.n_supervised for s in train))
    bins = best_fit_decreasing(lengths.tolist(), max_len)
    return {
        "tokens": int(lengths.sum()),
        "supervised_tokens": n_sup,
        "supervised_fraction": n_sup / int(lengths.sum()),
        "length_percentiles": {f"p{q}": int(np.percentile(lengths, q, method="lower")) for q in (50, 90, 99)}
        | {"max": int(lengths.max())},
        "max_len": max_len,
        "packed_rows": len(bins),
        "packing_efficiency": float(lengths.sum() / (len(bins) * max_len)),
    }
