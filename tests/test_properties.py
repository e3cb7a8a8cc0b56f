"""Property-based tests (hypothesis): random and malformed input thrown at the whole data path.

What is asserted, for every generated input:

- adapters (``sft.data.formats.ADAPTERS``, ``to_conversation``, ``detect_format``): the only exception is
  ``DataError``; whatever is returned by ``to_conversation`` is a valid canonical conversation;
- sources (``sft.data.sources.load_rows``) on files of random bytes / random JSON lines: only ``DataError``;
- render (``sft.data.render.render`` with the ``chatml`` and ``guanaco`` templates, on MPT's NeoX tokenizer
  and on the tiny byte tokenizer): only ``DataError`` / ``TemplateError``; every sample keeps the mask
  contract: same lengths, supervised labels equal their ids, and the maximal supervised runs decode to
  exactly ``lead + reply + end-of-turn text``, one run per assistant turn;
- ``prepare_data`` on random JSONL files with ``bad_rows="drop"``: only ``DataError``; every kept sample
  passes the validation;
- chat rows with reasoning, tool calls and tool results (answered by id, name or position) through the real
  Qwen2.5 and Qwen3 templates: every assistant turn supervised once (or only the last), each supervised run
  one turn with its reply, its calls and its reasoning, ending in ``<|im_end|>``; no tool result supervised.

The profile is fixed (``derandomize=True``, no example database, ``deadline=None``), so every run tries
the same inputs. The number of inputs generated is counted and written at the end of the module's run
("hypothesis inputs generated: N"), for the README's reliability section.
"""

import json
import os
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sft.data.formats import ADAPTERS, detect_format, to_conversation
from sft.data.prepare import prepare_data, validate_sample
from sft.data.render import SUPERVISE, TemplateError, end_of_turn_text, render, render_samples, stop_token_ids
from sft.data.schema import IGNORE_INDEX, ROLES, DataError
from sft.data.sources import load_rows
from sft.model.models import byte_tokenizer

N = int(os.environ.get("SFT_HYPOTHESIS_EXAMPLES", "150"))  # per test; the total is printed at the end
PROFILE = settings(
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=N,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
COUNT: Counter = Counter()


@pytest.fixture(scope="module", autouse=True)
def report_count(request):
    """Write the number of generated inputs into the pytest output once the module has run."""
    yield
    total = sum(COUNT.values())
    detail = ", ".join(f"{k} {v}" for k, v in sorted(COUNT.items()))
    line = f"hypothesis inputs generated: {total} ({detail})"
    plugins = request.config.pluginmanager
    reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    if reporter is None or capture is None:
        return
    with capture.global_and_fixture_disabled():  # past pytest's capture, into the session output
        reporter.write_line("")
        reporter.write_line(line)


# ----------------------------------------------------------------------------- strategies

# every marker a format or template gives meaning to, so that random text collides with them often
MARKERS = [
    "### Human:", "### Assistant:", "### System:", "<s>", "</s>", "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>",
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|padding|>", "{{", "}}", "{%", "%}", "\n", " ", "\t", "",
]  # fmt: skip
SAFE_CHAR = st.characters(codec="utf-8")  # any code point but surrogates (plain characters() draws them)
safe_text = st.lists(st.sampled_from(MARKERS) | st.text(SAFE_CHAR, max_size=6), max_size=6).map("".join)
# a quarter of the texts carry a lone surrogate (json.loads makes them from "\ud800"); st.text never does
any_text = st.one_of(
    safe_text,
    safe_text,
    safe_text,
    st.tuples(safe_text, st.sampled_from(["\ud800", "\udfff", "\udc80"]), safe_text).map("".join),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | any_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(any_text, inner, max_size=3),
    max_leaves=6,
)
KEYS = ["text", "messages", "question", "response", "system_prompt", "prompt", "system", "role", "content"]
key = st.sampled_from(KEYS) | any_text
value = any_text | json_values


def turns_text(marks):
    """Text made of format markers and random text, e.g. ``### Human: x### Assistant: y``."""
    return st.lists(st.tuples(st.sampled_from(marks), any_text), max_size=5).map(
        lambda parts: "".join(m + t for m, t in parts)
    )


message = st.one_of(
    st.fixed_dictionaries(
        {"role": st.sampled_from([*ROLES, "tool", "Assistant", ""]) | value, "content": value}
    ),
    st.dictionaries(key, value, max_size=3),
    value,
)


def shaped(conv):
    """A well-formed conversation written in each format: only its texts can be wrong."""
    q = next(m["content"] for m in conv if m["role"] == "user")
    a = conv[-1]["content"]
    pairs = [(m["role"], m["content"]) for m in conv if m["role"] != "system"]
    return st.sampled_from(
        [
            {"messages": conv},
            {"prompt": q, "response": a},
            {"question": q, "response": a, "system_prompt": conv[0]["content"]},
            {"text": "".join(("### Human: " if r == "user" else "### Assistant: ") + c for r, c in pairs)},
        ]
    )


rows = st.one_of(
    st.dictionaries(key, value, max_size=4),
    # a Python source may give keys of mixed types
    st.dictionaries(st.sampled_from(KEYS[:3]) | st.integers(0, 2), value, min_size=2, max_size=4),
    st.fixed_dictionaries({"text": turns_text(["### Human:", "### Assistant:", "### System:", " "])}),
    st.fixed_dictionaries(
        {"text": turns_text(["<s>[INST]", "[INST]", "[/INST]", "</s>", "<<SYS>>", "<</SYS>>", " "])}
    ),
    st.fixed_dictionaries({"messages": st.lists(message, max_size=5) | value}),
    st.fixed_dictionaries(
        {"question": value, "response": value}, optional={"system_prompt": value, "prompt": value}
    ),
    st.fixed_dictionaries({"prompt": value, "response": value}, optional={"system": value}),
    value,  # not an object at all
    st.deferred(lambda: (valid_conversation(safe_text) | valid_conversation(any_text)).flatmap(shaped)),
)


def valid_conversation(text):
    """Well-formed conversations (what the adapters produce) with contents drawn from ``text``."""
    content = text.map(str.strip).filter(bool)
    turn = st.tuples(content, content).map(
        lambda qa: [{"role": "user", "content": qa[0]}, {"role": "assistant", "content": qa[1]}]
    )
    return st.tuples(st.none() | content, st.lists(turn, min_size=1, max_size=3)).map(
        lambda x: ([{"role": "system", "content": x[0]}] if x[0] else []) + [m for t in x[1] for m in t]
    )


# ----------------------------------------------------------------------------- adapters


def check_canonical(conv):
    """The canonical shape ``to_conversation`` promises (see ``sft.data.formats``)."""
    assert isinstance(conv, list) and conv
    for i, m in enumerate(conv):
        assert set(m) == {"role", "content"}
        assert m["role"] in ROLES
        assert isinstance(m["content"], str) and m["content"] and m["content"] == m["content"].strip()
        assert m["role"] != "system" or i == 0
        m["content"].encode("utf-8")  # no lone surrogate: every content can be tokenized
    first = 1 if conv[0]["role"] == "system" else 0
    assert conv[first]["role"] == "user"
    assert conv[-1]["role"] == "assistant"


@PROFILE
@given(row=rows)
def test_adapters_raise_only_data_errors(row):
    COUNT["adapter rows"] += 1
    try:
        name = detect_format(row)
        assert name in ADAPTERS
    except DataError as e:
        # one line even when the row's keys hold line breaks: the data is quoted with repr, never raw
        assert "\n" not in str(e) and "\r" not in str(e), str(e)
        assert str(e).startswith(
            ("expected a JSON object, got", "unknown format (keys", "ambiguous format")
        ), str(e)
    for fmt in [None, *ADAPTERS]:
        try:
            conv = to_conversation(row, fmt, source="rand.jsonl", row_index=7)
        except DataError as e:
            assert str(e).startswith("rand.jsonl, row 7"), str(e)
            continue
        check_canonical(conv)
    if isinstance(row, dict):
        for fmt, adapter in ADAPTERS.items():
            try:
                conv = adapter(row)
            except DataError:
                continue
            assert isinstance(conv, list), fmt
            assert all(isinstance(m["role"], str) and isinstance(m["content"], str) for m in conv), fmt


def test_a_key_with_a_line_break_stays_on_one_line():
    with pytest.raises(DataError) as e:
        detect_format({"bad\nkey": "x"})
    assert str(e.value) == "unknown format (keys ['bad\\nkey']); name it with fmt= one of " + str(
        sorted(ADAPTERS)
    )


def test_lone_surrogate_is_a_data_error():
    """Found by the property test: ``json.loads('"\\ud800"')`` gives text no tokenizer can encode."""
    with pytest.raises(DataError, match=r"row 3, field 'messages\[1\]\.content'.*surrogate"):
        to_conversation(
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "a\ud800b"},
                ]
            },
            row_index=3,
        )


def test_mixed_type_keys_are_a_data_error():
    """Found by the property test: a row whose keys mix types made the error message itself crash."""
    with pytest.raises(DataError, match="missing field"):
        to_conversation({1: "x", "prompt": "q"}, "prompt_response")


# ----------------------------------------------------------------------------- sources

raw_lines = st.lists(
    st.binary(max_size=24)
    | rows.map(lambda r: json.dumps(r).encode("utf-8", "surrogatepass"))
    | st.sampled_from([b"[" * 5000, b"1" * 5000, b'{"a": NaN}', b"\xff\xfe", b'"\\ud800"', b"{}"]),
    max_size=6,
)


@PROFILE
@given(lines=raw_lines, suffix=st.sampled_from([".jsonl", ".json", ".parquet"]))
def test_sources_raise_only_data_errors(lines, suffix):
    COUNT["source files"] += 1
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"rand{suffix}"
        path.write_bytes(b"\n".join(lines))
        try:
            got = list(load_rows(str(path)))
        except DataError as e:
            assert str(path) in str(e)
            return
        for i, row in got:
            assert isinstance(i, int) and i >= 1 and isinstance(row, dict)


def test_invalid_utf8_line_names_the_line(tmp_path):
    """Found by the property test: bytes that are not UTF-8 raised UnicodeDecodeError."""
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"prompt": "a", "response": "b"}\n\n{"prompt": "\xff"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl, row 3: not UTF-8"):
        list(load_rows(str(path)))


@pytest.mark.parametrize("line", [b"[" * 5000, b"1" * 5000])
def test_pathological_json_line_is_a_data_error(tmp_path, line):
    """Found by the property test: deep nesting (RecursionError), 5000-digit ints (ValueError)."""
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"prompt": "a", "response": "b"}\n' + line + b"\n")
    with pytest.raises(DataError, match=r"bad\.jsonl, row 2: malformed JSON line"):
        list(load_rows(str(path)))


# ----------------------------------------------------------------------------- render


@pytest.fixture(scope="module")
def byte_tok():
    return byte_tokenizer()


def supervised_runs(sample):
    runs, cur = [], []
    for i, lab in zip(sample.input_ids, sample.labels, strict=True):
        if lab != IGNORE_INDEX:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return runs


def check_mask_contract(sample, conv, tok, template):
    """Supervised tokens are exactly each assistant reply plus its end-of-turn text (CONTRACTS.md)."""
    assert len(sample.input_ids) == len(sample.labels)
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(sample.input_ids, sample.labels, strict=True))
    marker = end_of_turn_text(tok, template)
    lead = " " if template == "guanaco" else ""
    want = [lead + m["content"] + marker for m in conv if m["role"] == "assistant"]
    got = [
        tok.decode(r, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        for r in supervised_runs(sample)
    ]
    assert got == want


@PROFILE
@given(
    conv=valid_conversation(safe_text), template=st.sampled_from(["chatml", "guanaco"]), which=st.booleans()
)
def test_render_keeps_the_mask_contract(neox_tokenizer, byte_tok, conv, template, which):
    COUNT["rendered conversations"] += 1
    tok = neox_tokenizer if which else byte_tok
    check_mask_contract(render(conv, tok, template), conv, tok, template)


@PROFILE
@given(conv=st.lists(message, max_size=5) | value, template=st.sampled_from(["chatml", "guanaco"]))
def test_render_of_malformed_conversations(byte_tok, conv, template):
    COUNT["malformed conversations"] += 1
    try:
        sample = render(conv, byte_tok, template)
    except (DataError, TemplateError):
        return
    # accepted: the conversation was well-formed enough to keep the contract
    check_mask_contract(sample, conv, byte_tok, template)


def test_render_refuses_a_non_string_content(byte_tok):
    with pytest.raises(DataError, match=r"field 'messages\[1\]\.content'"):
        render([{"role": "user", "content": "q"}, {"role": "assistant", "content": 3}], byte_tok, "chatml")


# ----------------------------------------------------------------------------- prepare


@PROFILE
@given(lines=raw_lines)
def test_prepare_drops_bad_rows_and_keeps_valid_samples(byte_tok, lines):
    COUNT["prepared files"] += 1
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "rand.jsonl"
        path.write_bytes(b"\n".join(lines))
        try:
            prepared = prepare_data(
                str(path), byte_tok, template="chatml", max_len=64, bad_rows="drop", use_cache=False
            )
        except DataError:
            return
        stops = stop_token_ids(byte_tok, "chatml")
        for s in prepared.train:
            assert len(s) <= 64
            assert validate_sample(s, bos_id=None, stop_ids=stops, marker_id=stops[-1]) is None


# ----------------------------------------------------------------------------- chat fields (issue 27)

chat_text = (
    st.text(st.sampled_from("abc xyz.,!?\n{}\"'"), min_size=1, max_size=12).map(str.strip).filter(bool)
)


@st.composite
def chat_rows(draw):
    """OpenAI-format rows: a system prompt or not, exchanges whose replies may reason and call tools, each
    call answered by a tool message (by id, by name or by position) before the next reply."""
    msgs = [{"role": "system", "content": draw(chat_text)}] if draw(st.booleans()) else []
    n_results = 0
    for _ in range(draw(st.integers(1, 3))):
        msgs.append({"role": "user", "content": draw(chat_text)})
        for _ in range(draw(st.integers(0, 2))):  # tool-call rounds before the answer
            names = draw(st.lists(st.sampled_from(["get_weather", "lookup", "add"]), min_size=1, max_size=2))
            calls = [
                {"id": f"c{n_results + j}", "function": {"name": n, "arguments": {"q": draw(chat_text)}}}
                for j, n in enumerate(names)
            ]
            call = {"role": "assistant", "content": draw(st.just("") | chat_text), "tool_calls": calls}
            if draw(st.booleans()):
                call[draw(st.sampled_from(["reasoning_content", "thinking", "reasoning"]))] = draw(chat_text)
            msgs.append(call)
            for c in calls:
                how = draw(st.sampled_from(["id", "name", "position"]))
                result = {"role": "tool", "content": f"RESULT{n_results}"}
                result |= {"id": {"tool_call_id": c["id"]}, "name": {"name": c["function"]["name"]}}.get(
                    how, {}
                )
                msgs.append(result)
                n_results += 1
        reply = {"role": "assistant", "content": draw(chat_text)}
        if draw(st.booleans()):
            reply["reasoning_content"] = draw(chat_text)
        msgs.append(reply)
    return {"messages": msgs}


def last_query(conv) -> int:
    return max(i for i, m in enumerate(conv) if m["role"] == "user")


@pytest.fixture(scope="module")
def chat_toks():
    from tests.chat_fixtures import tokenizer_for

    return {name: tokenizer_for(name) for name in ("qwen2_5_instruct", "qwen3")}


@PROFILE
@given(
    row=chat_rows(), name=st.sampled_from(["qwen2_5_instruct", "qwen3"]), policy=st.sampled_from(SUPERVISE)
)
def test_chat_fields_keep_the_mask_contract(chat_toks, row, name, policy):
    """Through the real Qwen templates, for each ``supervise`` policy: every assistant turn is supervised
    exactly once (or only the last; one sample unless 'all'), each supervised run is one turn ending in
    ``<|im_end|>`` and holding its reply, its calls' names and (Qwen3, where rendered) its reasoning; no tool
    result is ever supervised. Qwen2.5 refuses reasoning (it ignores it) in one DataError."""
    COUNT["chat rows"] += 1
    tok = chat_toks[name]
    conv = to_conversation(row, "messages")
    try:
        out = render_samples([conv], tok, supervise=policy)
    except DataError as e:
        assert name == "qwen2_5_instruct" and "ignores this field" in str(e) and "reasoning" in str(e), str(e)
        return
    asst = [i for i, m in enumerate(conv) if m["role"] == "assistant"]
    turns = sorted(t for r in out for t in r.turns)
    assert turns == (asst[-1:] if policy == "last" else asst)
    assert len(out) == 1 or policy == "all"
    for r in out:
        runs = supervised_runs(r.sample)
        assert len(runs) == len(r.turns)
        for i, run in zip(r.turns, runs):
            text = tok.decode(run, skip_special_tokens=False)
            m = conv[i]
            assert text.endswith("<|im_end|>") and text.count("<|im_end|>") == 1, text
            assert m["content"] in text and "RESULT" not in text
            assert all(f'"name": "{c["function"]["name"]}"' in text for c in m.get("tool_calls", []))
            if name == "qwen3" and m.get("reasoning_content") and (policy != "once" or i > last_query(conv)):
                assert f"<think>\n{m['reasoning_content']}\n</think>" in text
