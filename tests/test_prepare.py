"""prepare_data on the real Guanaco file and the bundled sample: drops, cuts, split, cache, refusals."""

import json
import pickle
import time
from pathlib import Path

import numpy as np
import pytest

from sft.data.packing import pack, packing_efficiency
from sft.data.prepare import prepare_data
from sft.data.render import TEMPLATES, render
from sft.data.sample_data import BUNDLED
from sft.data.schema import IGNORE_INDEX, DataError


@pytest.fixture(scope="module")
def guanaco(shared_data, neox_tokenizer, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    t0 = time.perf_counter()
    p = prepare_data(
        str(shared_data / "guanaco-1k.jsonl"),
        neox_tokenizer,
        template="guanaco",
        bad_rows="drop",
        cache_dir=cache,
    )
    return p, time.perf_counter() - t0, cache


def test_guanaco_real_file(guanaco, neox_tokenizer):
    p, seconds, _ = guanaco
    s = p.stats
    # the only drops: 3 rows with an empty turn, 3 whose first reply alone exceeds 2048 tokens
    assert s["drops"] == {"bad_row": 3, "overlong_first_reply": 3}
    assert s["cut"] == 9 and s["rows"] == 1000 and s["train"] == 994 and s["eval"] == 0
    assert s["format"] == "guanaco"
    assert all(len(x.input_ids) <= 2048 for x in p.train)
    assert all(
        x.input_ids[-1] == 0 and x.labels[-1] == 0 for x in p.train
    )  # every sample ends with a supervised EOS
    rows = pack(p.train, 2048, neox_tokenizer.pad_token_id)
    assert packing_efficiency(rows) >= 0.95
    assert s["packing_efficiency"] == pytest.approx(packing_efficiency(rows))
    assert s["length_percentiles"]["max"] <= 2048
    # generous bound: this 2-core machine is shared; the preview command reports the real figure
    assert seconds < 30


def test_guanaco_cache_hit(guanaco, shared_data, neox_tokenizer):
    p, _, cache = guanaco
    t0 = time.perf_counter()
    q = prepare_data(
        str(shared_data / "guanaco-1k.jsonl"),
        neox_tokenizer,
        template="guanaco",
        bad_rows="drop",
        cache_dir=cache,
    )
    assert q.stats["cached"] is True and q.fingerprint == p.fingerprint
    assert [x.input_ids for x in q.train] == [x.input_ids for x in p.train]
    assert time.perf_counter() - t0 < 5


def test_guanaco_bad_rows_error_by_default(shared_data, neox_tokenizer, tmp_path):
    with pytest.raises(DataError) as e:
        prepare_data(
            str(shared_data / "guanaco-1k.jsonl"), neox_tokenizer, template="guanaco", cache_dir=tmp_path
        )
    assert str(e.value).endswith("guanaco-1k.jsonl, row 435, field 'messages[4].content': empty user content")


def test_bundled_split_deterministic(neox_tokenizer, tmp_path):
    a = prepare_data("bundled", neox_tokenizer, template="chatml", eval_size=5, seed=0, cache_dir=tmp_path)
    b = prepare_data("bundled", neox_tokenizer, template="chatml", eval_size=5, seed=0, use_cache=False)
    c = prepare_data("bundled", neox_tokenizer, template="chatml", eval_size=0.25, seed=1, cache_dir=tmp_path)
    assert (
        a.eval_conversations == b.eval_conversations and len(a.eval) == 5 and len(a.train) == len(BUNDLED) - 5
    )
    assert len(c.eval) == 10 and c.eval_conversations != a.eval_conversations
    assert a.fingerprint != c.fingerprint
    train_ids = {tuple(x.input_ids) for x in a.train}
    for conv, sample in zip(a.eval_conversations, a.eval):
        assert sample.input_ids == render(conv, neox_tokenizer, "chatml").input_ids
        assert tuple(sample.input_ids) not in train_ids
    assert a.stats["drops"] == {} and a.stats["cut"] == 0


def test_overlong_cut_and_drop(neox_tokenizer, tmp_path):
    conv = BUNDLED[-1]  # system + 2 exchanges
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"messages": conv}) + "\n")
    full = render(conv, neox_tokenizer, "guanaco")
    first = render(conv[:3], neox_tokenizer, "guanaco")
    p = prepare_data(str(path), neox_tokenizer, template="guanaco", max_len=len(full) - 1, use_cache=False)
    assert (
        p.stats["cut"] == 1 and p.train[0].input_ids == first.input_ids and p.train[0].labels == first.labels
    )
    with pytest.raises(
        DataError, match=r"one\.jsonl: no training sample left after filtering \(drops: \{'overlong': 1\}\)"
    ):
        prepare_data(
            str(path),
            neox_tokenizer,
            template="guanaco",
            max_len=len(full) - 1,
            overlong="drop",
            use_cache=False,
        )
    with pytest.raises(DataError, match=r"drops: \{'overlong_first_reply': 1\}"):
        prepare_data(str(path), neox_tokenizer, template="guanaco", max_len=len(first) - 1, use_cache=False)


def test_validate_sample_reasons():
    """Masks derived from rendered prefixes cannot leave the EOS out, so the checks are pinned on hand-made samples."""
    from sft.data.prepare import validate_sample
    from sft.data.render import Sample

    X = IGNORE_INDEX
    kw = dict(bos_id=0, stop_ids=[0], marker_id=0)
    assert validate_sample(Sample([5, 6, 7, 0], [X, X, 7, 0]), **kw) is None
    assert validate_sample(Sample([5, 6, 7, 0], [X, X, X, X]), **kw) == "empty mask: no supervised token"
    assert validate_sample(Sample([5, 6, 7, 0], [X, X, 7, X]), **kw).startswith(
        "an end-of-turn token right after a reply is unsupervised"
    )
    assert validate_sample(Sample([5, 6, 7, 8], [X, X, 7, 8]), **kw) == (
        "a supervised reply does not end with the end-of-turn token (id 0)"
    )
    assert validate_sample(Sample([0, 0, 7, 0], [X, X, 7, 0]), **kw) == "doubled BOS (id 0) at the start"


def test_refuses_doubled_bos(neox_tokenizer):
    doubled = "{{ bos_token + bos_token }}" + TEMPLATES["guanaco"]
    with pytest.raises(DataError, match=r"^bundled, row 1: refusing to train: doubled BOS \(id 0\)"):
        prepare_data("bundled", neox_tokenizer, template=doubled, use_cache=False)


def test_refuses_template_without_end_token(neox_tokenizer):
    no_eos = TEMPLATES["guanaco"].replace(" + eos_token", "")
    with pytest.raises(DataError, match=r"^bundled: refusing to train: .* no end-of-turn marker"):
        prepare_data("bundled", neox_tokenizer, template=no_eos, use_cache=False)


def test_pad_equal_eos_keeps_eos_supervised(shared_data, tmp_path):
    from sft.model.models import load_tokenizer

    tok = load_tokenizer(shared_data / "gpt-neox-20b-tokenizer.json")
    assert (tok.eos_token_id, tok.pad_token_id) == (0, 1)
    tok.pad_token = tok.eos_token
    p = prepare_data("bundled", tok, template="guanaco", use_cache=False)
    assert all(x.input_ids[-1] == 0 and x.labels[-1] == 0 for x in p.train)
    rows = pack(p.train, 512, tok.pad_token_id)
    # the EOS closing each document is a target of the token before it, padding never is
    for r in rows:
        real = r["attention_mask"].bool()
        assert (r["targets"][~real] == IGNORE_INDEX).all()
        ends = (r["input_ids"] == 0) & real
        assert int(ends.sum()) == int((r["targets"] == 0).sum())


def test_bad_inputs_through_prepare(tmp_path, neox_tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": ""}\n')
    with pytest.raises(
        DataError, match=r"d\.jsonl, row 2, field 'messages\[1\]\.content': empty assistant content"
    ):
        prepare_data(str(path), neox_tokenizer, template="chatml", use_cache=False)
    path.write_text('{"prompt": "a", "response": "b"}\n{"prompt": 1\n')
    with pytest.raises(DataError, match=r"d\.jsonl, row 2: malformed JSON line"):
        prepare_data(str(path), neox_tokenizer, template="chatml", use_cache=False)
    path.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl, row 2, field 'response': missing field"):
        prepare_data(str(path), neox_tokenizer, template="chatml", use_cache=False)
    path.write_text('{"prompt": "a", "response": ""}\n')
    with pytest.raises(
        DataError, match=r"d\.jsonl: no usable conversation in 1 rows \(drops: \{'bad_row': 1\}\)"
    ):
        prepare_data(str(path), neox_tokenizer, template="chatml", use_cache=False, bad_rows="drop")
    with pytest.raises(DataError, match=r"missing\.jsonl: file not found"):
        prepare_data(str(tmp_path / "missing.jsonl"), neox_tokenizer, template="chatml", use_cache=False)


# ----------------------------------------------------------------------------- the cache file


def _bundled(tok, cache):
    return prepare_data("bundled", tok, template="chatml", eval_size=5, seed=0, cache_dir=cache)


def _same(a, b):
    assert [(s.input_ids, s.labels) for s in a.train] == [(s.input_ids, s.labels) for s in b.train]
    assert [(s.input_ids, s.labels) for s in a.eval] == [(s.input_ids, s.labels) for s in b.eval]
    assert a.eval_conversations == b.eval_conversations and a.fingerprint == b.fingerprint


def test_cache_is_arrays_and_json_and_round_trips(neox_tokenizer, tmp_path):
    a = _bundled(neox_tokenizer, tmp_path)
    (f,) = tmp_path.iterdir()
    assert f.name == f"prepared-{a.fingerprint}.npz"
    with np.load(f, allow_pickle=False) as z:  # no object array anywhere: pickle-free by construction
        assert all(z[k].dtype in (np.int64, np.uint8) for k in z.files)
        assert json.loads(z["meta"].tobytes())["fingerprint"] == a.fingerprint
    b = _bundled(neox_tokenizer, tmp_path)
    assert b.stats["cached"] is True and a.stats["cached"] is False
    _same(a, b)
    assert {k: v for k, v in b.stats.items() if k not in ("cached", "load_seconds")} == {
        k: v for k, v in a.stats.items() if k != "cached"
    }


@pytest.mark.parametrize(
    "name,mutate",
    [
        ("truncated", lambda b: b[: len(b) // 2]),
        ("empty", lambda b: b""),
        ("random_bytes", lambda b: bytes(range(256)) * 8),
    ],
)
def test_damaged_cache_is_rebuilt(neox_tokenizer, tmp_path, caplog, name, mutate):
    a = _bundled(neox_tokenizer, tmp_path)
    (f,) = tmp_path.iterdir()
    f.write_bytes(mutate(f.read_bytes()))
    with caplog.at_level("WARNING", logger="sft.data.prepare"):
        b = _bundled(neox_tokenizer, tmp_path)
    assert "ignoring unreadable data cache" in caplog.text and b.stats["cached"] is False
    _same(a, b)
    assert _bundled(neox_tokenizer, tmp_path).stats["cached"] is True  # rewritten whole


def test_a_pickle_where_the_cache_is_is_never_executed(neox_tokenizer, tmp_path, caplog):
    a = _bundled(neox_tokenizer, tmp_path)
    (f,) = tmp_path.iterdir()
    marker = tmp_path.parent / f"{tmp_path.name}-pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    pickle_bytes = pickle.dumps(Payload())
    f.write_bytes(pickle_bytes)
    (tmp_path / f"prepared-{a.fingerprint}.pkl").write_bytes(pickle_bytes)  # where the old cache lived
    with caplog.at_level("WARNING", logger="sft.data.prepare"):
        b = _bundled(neox_tokenizer, tmp_path)
    assert not marker.exists()
    assert "ignoring unreadable data cache" in caplog.text and "pickle" in caplog.text
    assert b.stats["cached"] is False
    _same(a, b)
