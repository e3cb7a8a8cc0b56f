"""One huge row costs what a normal row costs (issue 20, item 5).

A row that cannot fit in ``max_len`` tokens is found from a prefix of its text; it is never tokenized
whole. The result is the one a whole tokenization gives: same cuts, same drops, same samples.
"""

import json
import random
import resource
import time

import pytest

from sft.data import render
from sft.data.prepare import prepare_data
from sft.data.render import render_batch
from sft.model.models import byte_tokenizer

HUGE_CHARS = 20_000_000  # a 20 MB line


def _tokenizers(request):
    if request.param == "byte":
        return byte_tokenizer()
    return request.getfixturevalue("neox_tokenizer")


@pytest.fixture(params=["byte", "neox"])
def tok(request):
    return _tokenizers(request)


def _write_rows(path, rows):
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def _normal_rows(n=30):
    return [
        {
            "messages": [
                {"role": "user", "content": f"question {i}"},
                {"role": "assistant", "content": f"answer {i}"},
            ]
        }
        for i in range(n)
    ]


@pytest.fixture
def no_long_tokenization(monkeypatch):
    """Fail at once (instead of tokenizing for minutes) if any text over 2 MB reaches the tokenizer."""
    real = render._encode
    seen = []

    def spy(tokenizer, texts):
        seen.extend(len(t) for t in texts)
        assert max((len(t) for t in texts), default=0) <= 2_000_000, "a huge row was tokenized whole"
        return real(tokenizer, texts)

    monkeypatch.setattr(render, "_encode", spy)
    return seen


@pytest.mark.parametrize("overlong", ["cut", "drop"])
def test_a_20_mb_row_is_prepared_in_seconds(tmp_path, tok, overlong, no_long_tokenization):
    big = ("lorem ipsum dolor sit amet, consectetur " * (HUGE_CHARS // 40 + 1))[:HUGE_CHARS]
    huge = {
        "messages": [
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "hi, how can I help?"},
            {"role": "user", "content": "write a lot"},
            {"role": "assistant", "content": big},
        ]
    }
    huge_first = {"messages": [{"role": "user", "content": "write"}, {"role": "assistant", "content": big}]}
    path = _write_rows(tmp_path / "huge.jsonl", [*_normal_rows(), huge, huge_first])
    del big, huge, huge_first
    assert path.stat().st_size > 2 * HUGE_CHARS
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    p = prepare_data(str(path), tok, template="chatml", max_len=512, overlong=overlong, use_cache=False)
    seconds = time.perf_counter() - t0
    rss_gib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 2**20  # ru_maxrss is in KiB
    assert seconds <= 5, f"{seconds:.1f} s"
    assert rss_gib <= 1.0, f"{rss_gib:.2f} GiB above the process's earlier peak"
    assert max(no_long_tokenization) <= 2_000_000
    if overlong == "cut":  # the first exchange of the huge conversation fits: kept, cut after it
        assert p.stats["drops"] == {"overlong_first_reply": 1} and p.stats["cut"] == 1
        assert len(p.train) == 31
        first = [
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "hi, how can I help?"},
        ]
        (want,), _ = render_batch([first], tok, "chatml")
        assert want.input_ids in [s.input_ids for s in p.train]
    else:
        assert p.stats["drops"] == {"overlong": 2} and p.stats["cut"] == 0 and len(p.train) == 30
    assert all(len(s.input_ids) <= 512 for s in p.train)


def _long_text(kind: str, n: int, rng: random.Random) -> str:
    if kind == "words":
        pool = ["alpha", "beta", "Ω-mega", "日本語", "the", "  ", "\n\n", "code()", "x" * 40]
        return " ".join(rng.choice(pool) for _ in range(n // 5))
    if kind == "no_space":  # one pre-token piece for most tokenizers: the cut splits it
        return "".join(rng.choice("abcdefgh日本語") for _ in range(n))
    return "".join("x" + " " * rng.randint(1, 900) for _ in range(n // 450))  # long runs of white space


@pytest.mark.parametrize("kind", ["words", "no_space", "spaces"])
@pytest.mark.parametrize("max_len", [64, 700])
def test_a_prefix_gives_the_same_tokens_cuts_and_labels_as_the_whole_text(tok, kind, max_len):
    rng = random.Random(f"{kind}{max_len}")
    conv = [
        {"role": "user", "content": "short q"},
        {"role": "assistant", "content": "short a"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": _long_text(kind, 60_000, rng)},
        {"role": "user", "content": "q3"},
        {"role": "assistant", "content": "a3"},
    ]
    (whole,), (whole_cuts,) = render_batch([conv], tok, "chatml")
    (probed,), (probed_cuts,) = render_batch([conv], tok, "chatml", max_len=max_len)
    n = len(probed.input_ids)
    assert len(whole.input_ids) > max_len
    assert n > max_len and n < len(whole.input_ids)  # a prefix only, and still too long
    assert probed.input_ids == whole.input_ids[:n] and probed.labels == whole.labels[:n]
    for a, b in zip(whole_cuts, probed_cuts, strict=True):  # each cut: exact, or (both) past max_len
        assert a == b or (a > max_len and b > max_len)
    assert probed_cuts[0] == whole_cuts[0] <= max_len


def test_prepared_data_is_the_same_with_and_without_the_probe(tmp_path, tok, monkeypatch):
    rng = random.Random(0)
    rows = _normal_rows(10)
    for k in range(6):
        msgs = []
        for t in range(3):  # replies of mixed sizes: some fit, some force a cut, some a drop
            size = rng.choice([50, 3_000, 40_000])
            msgs += [
                {"role": "user", "content": f"q{k}.{t} " + _long_text("words", size // 4, rng)},
                {"role": "assistant", "content": _long_text(rng.choice(["words", "no_space"]), size, rng)},
            ]
        rows.append({"messages": msgs})
    path = _write_rows(tmp_path / "mixed.jsonl", rows)
    kw = dict(template="chatml", max_len=1024, use_cache=False)
    probed = prepare_data(str(path), tok, **kw)
    monkeypatch.setattr(render, "PROBE_CHARS_PER_TOKEN", 10**9)  # every text tokenized whole
    whole = prepare_data(str(path), tok, **kw)
    assert probed.stats["cut"] > 0 and probed.stats["drops"]
    assert probed.stats["drops"] == whole.stats["drops"] and probed.stats["cut"] == whole.stats["cut"]
    assert [s.input_ids for s in probed.train] == [s.input_ids for s in whole.train]
    assert [s.labels for s in probed.train] == [s.labels for s in whole.train]
