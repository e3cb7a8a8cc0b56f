"""Packing rows and padded batches: exact tensors, document boundaries, best-fit behaviour."""

import pytest
import torch

from sft.data.packing import KEYS, best_fit_decreasing, collate_rows, pack, packing_efficiency, pad_collate
from sft.data.render import Sample
from sft.data.schema import IGNORE_INDEX as X

A = Sample([10, 11, 12, 13], [X, X, 12, 13])
B = Sample([20, 21, 22], [X, 21, 22])
C = Sample([30, 31, 32, 33, 34], [X, X, X, 33, 34])
PAD = 0  # pad id equal to an id that is also supervised elsewhere: targets must not care


def test_pack_exact_rows():
    rows = pack([A, B, C], max_len=8, pad_id=PAD)
    # decreasing: C(5) opens row 0, A(4) does not fit there (5+4>8) and opens row 1, B(3) best fits row 0 (free 3)
    assert len(rows) == 2
    r0, r1 = rows
    assert r0["input_ids"].tolist() == [30, 31, 32, 33, 34, 20, 21, 22]
    assert r0["targets"].tolist() == [X, X, 33, 34, X, 21, 22, X]
    assert r0["position_ids"].tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert r0["document_ids"].tolist() == [0, 0, 0, 0, 0, 1, 1, 1]
    assert r0["attention_mask"].tolist() == [1] * 8
    assert r1["input_ids"].tolist() == [10, 11, 12, 13, PAD, PAD, PAD, PAD]
    assert r1["targets"].tolist() == [X, 12, 13, X, X, X, X, X]
    assert r1["position_ids"].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert r1["document_ids"].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert r1["attention_mask"].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    assert {k: v.dtype for k, v in r0.items()} == {
        "input_ids": torch.long,
        "targets": torch.long,
        "position_ids": torch.long,
        "document_ids": torch.int32,
        "attention_mask": torch.long,
    }
    assert packing_efficiency(rows) == 12 / 16


def test_pad_collate_matches_contract():
    b = pad_collate([A, B], pad_id=PAD)
    assert b["input_ids"].tolist() == [[10, 11, 12, 13], [20, 21, 22, PAD]]
    assert b["targets"].tolist() == [[X, 12, 13, X], [21, 22, X, X]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 2, 0]]
    assert b["document_ids"].tolist() == [[0, 0, 0, 0], [0, 0, 0, 1]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert pad_collate([A], PAD, pad_to=6)["input_ids"].shape == (1, 6)
    with pytest.raises(ValueError, match="shorter than the longest"):
        pad_collate([A], PAD, pad_to=3)
    assert packing_efficiency(b) == 7 / 8


def test_collate_rows_shapes():
    batch = collate_rows(pack([A, B, C], 8, PAD))
    assert set(batch) == set(KEYS)
    assert all(v.shape == (2, 8) for v in batch.values())


def test_boundaries_on_many_random_samples():
    g = torch.Generator().manual_seed(0)
    samples = []
    for _ in range(200):
        n = int(torch.randint(2, 60, (1,), generator=g))
        ids = torch.randint(2, 1000, (n,), generator=g).tolist()
        cut = int(torch.randint(1, n, (1,), generator=g))
        samples.append(Sample(ids, [X] * cut + ids[cut:]))
    rows = pack(samples, 128, PAD)
    seen = []
    for r in rows:
        doc, pos, tgt, ids = r["document_ids"], r["position_ids"], r["targets"], r["input_ids"]
        assert (doc[1:] >= doc[:-1]).all()
        starts = (
            torch.nonzero(torch.diff(doc, prepend=torch.tensor([-1], dtype=doc.dtype))).flatten().tolist()
        )
        for a, b in zip(starts, starts[1:] + [128]):
            assert pos[a:b].tolist() == list(range(b - a))  # restart per document
            assert tgt[b - 1] == X  # nothing predicted across the boundary
            if r["attention_mask"][a]:
                seen.append(tuple(ids[a:b].tolist()))
            else:
                assert (tgt[a:b] == X).all() and b == 128
    # every sample appears exactly once, whole
    assert sorted(seen) == sorted(tuple(s.input_ids) for s in samples)
    assert sum(int((r["targets"] != X).sum()) for r in rows) == sum(
        sum(x != X for x in s.labels[1:]) for s in samples
    )
    assert packing_efficiency(rows) > 0.95


def test_best_fit_refuses_overlong():
    assert best_fit_decreasing([3, 3, 2, 2], 5) == [[0, 2], [1, 3]]
    with pytest.raises(ValueError, match="more than max_len 4"):
        best_fit_decreasing([5], 4)
