"""Packing rendered samples into fixed-length rows, keeping document boundaries.

Every row (``pack``) and every batch (``pad_collate``, ``collate_rows``) follows CONTRACTS.md, "Batch":

- ``input_ids`` long: the tokens; padding is ``pad_id``.
- ``targets`` long, already shifted: ``targets[t] = labels[t + 1]`` inside a document, ``IGNORE_INDEX``
  on the last token of each document and on all padding, so no target crosses a document boundary.
  Labels never depend on ``pad_id`` (a pad id equal to EOS keeps its EOS targets).
- ``position_ids`` long: ``0, 1, ...`` restarting at each document; the padding at the end of a row is
  one more document and counts ``0, 1, ...`` on its own.
- ``document_ids`` int32: ``0, 1, 2, ...`` per document in the row, non-decreasing; the padding is one
  more document, so every query attends at least to itself (no NaN rows under a document mask).
- ``attention_mask`` long: 1 on real tokens, 0 on padding (for counting; models use ``document_ids``).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np
import torch

from sft.data.render import Sample
from sft.data.schema import IGNORE_INDEX

KEYS = ("input_ids", "targets", "position_ids", "document_ids", "attention_mask")


def _row(samples: Sequence[Sample], length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Lay ``samples`` end to end in one row of ``length`` tokens (see module docstring)."""
    used = sum(len(s.input_ids) for s in samples)
    if used > length:
        raise ValueError(f"samples hold {used} tokens, more than the row length {length}")
    pad = length - used
    ids = np.full(length, pad_id, dtype=np.int64)
    tgt = np.full(length, IGNORE_INDEX, dtype=np.int64)
    pos = np.empty(length, dtype=np.int64)
    doc = np.full(length, len(samples), dtype=np.int32)
    a = 0
    for d, s in enumerate(samples):
        n = len(s.input_ids)
        ids[a : a + n] = s.input_ids
        tgt[a : a + n - 1] = s.labels[1:]  # shifted; the document's last position keeps IGNORE_INDEX
        pos[a : a + n] = np.arange(n)
        doc[a : a + n] = d
        a += n
    pos[used:] = np.arange(pad)
    mask = np.zeros(length, dtype=np.int64)
    mask[:used] = 1
    return {
        "input_ids": torch.from_numpy(ids),
        "targets": torch.from_numpy(tgt),
        "position_ids": torch.from_numpy(pos),
        "document_ids": torch.from_numpy(doc),
        "attention_mask": torch.from_numpy(mask),
    }


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of indices into ``lengths``: longest first, each into the fullest bin it still fits in.

    Deterministic (ties broken by index). O(n log n) with a sorted list of free space per bin.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (free space, bin index)
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"sample {i} has {n} tokens, more than max_len {capacity}")
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            space, b = free.pop(k)
        else:
            space, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        bisect.insort(free, (space - n, b))
    return bins


def pack(samples: Sequence[Sample], max_len: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    """Pack ``samples`` (each ``<= max_len`` tokens) into rows of exactly ``max_len`` tokens.

    Best-fit decreasing; within a row, documents keep the order they were placed in. Returns one dict of
    1-D tensors (keys ``KEYS``, length ``max_len``) per row.
    """
    bins = best_fit_decreasing([len(s.input_ids) for s in samples], max_len)
    return [_row([samples[i] for i in b], max_len, pad_id) for b in bins]


def collate_rows(rows: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack packed rows into a ``[B, T]`` batch."""
    return {k: torch.stack([r[k] for r in rows]) for k in KEYS}


def pad_collate(samples: Sequence[Sample], pad_id: int, pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """One sample per row, padded to the longest (or to ``pad_to``): the unpacked comparison batch."""
    length = max(len(s.input_ids) for s in samples)
    if pad_to is not None:
        if pad_to < length:
            raise ValueError(f"pad_to={pad_to} is shorter than the longest sample ({length})")
        length = pad_to
    return collate_rows([_row([s], length, pad_id) for s in samples])


def packing_efficiency(rows: Sequence[dict[str, torch.Tensor]] | dict[str, torch.Tensor]) -> float:
    """Real tokens / row tokens, over a list of rows or one batch."""
    if isinstance(rows, dict):
        rows = [rows]
    real = sum(int(r["attention_mask"].sum()) for r in rows)
    total = sum(r["attention_mask"].numel() for r in rows)
    return real / total if total else 0.0
