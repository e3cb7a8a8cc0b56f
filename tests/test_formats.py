"""Adapters, format detection, sources and their error messages (file, row, field)."""

import json

import pandas as pd
import pytest

from sft.data.formats import ADAPTERS, detect_format, to_conversation
from sft.data.sample_data import BUNDLED
from sft.data.schema import DataError
from sft.data.sources import load_rows

SYS, Q1, A1, Q2, A2 = "Be brief.", "What is 2+2?", "4.", "And 3+3?", "6, of course."
MULTI = [
    {"role": "user", "content": Q1},
    {"role": "assistant", "content": A1},
    {"role": "user", "content": Q2},
    {"role": "assistant", "content": A2},
]
WITH_SYS = [{"role": "system", "content": SYS}, *MULTI]

# one raw row per format, each holding the same conversation (with or without the system prompt)
RAW = {
    "guanaco": ({"text": f"### Human: {Q1}### Assistant: {A1}### Human: {Q2}### Assistant: {A2}"}, MULTI),
    "llama2": (
        {
            "text": f"<s>[INST] <<SYS>>\n{SYS}\n<</SYS>>\n\n{Q1} [/INST] {A1} </s><s>[INST] {Q2} [/INST] {A2} </s>"
        },
        WITH_SYS,
    ),
    "messages": ({"messages": WITH_SYS, "id": 7}, WITH_SYS),
    "openorca": ({"id": "x", "system_prompt": SYS, "question": Q1, "response": A1}, WITH_SYS[:3]),
    "prompt_response": ({"prompt": Q1, "response": A1}, MULTI[:2]),
}


@pytest.mark.parametrize("fmt", sorted(RAW))
def test_every_adapter_detected_and_exact(fmt):
    row, expected = RAW[fmt]
    assert detect_format(row) == fmt
    assert to_conversation(row) == expected
    assert to_conversation(row, fmt) == expected


def test_adapters_all_named():
    assert set(ADAPTERS) == {"guanaco", "openorca", "messages", "llama2", "prompt_response"}


def test_llama2_without_system_and_openorca_empty_system():
    row = {"text": f"<s>[INST] {Q1} [/INST] {A1} </s>"}
    assert to_conversation(row) == MULTI[:2]
    assert to_conversation({"system_prompt": "", "question": Q1, "response": A1}) == MULTI[:2]


def test_prompt_response_custom_fields():
    row = {"instruction": Q1, "output": A1, "sys": SYS}
    fields = {"prompt": "instruction", "response": "output", "system": "sys"}
    assert detect_format(row, fields) == "prompt_response"
    assert to_conversation(row, fields=fields) == WITH_SYS[:3]


def test_detect_unknown_and_ambiguous():
    with pytest.raises(DataError, match="unknown format"):
        detect_format({"foo": "bar"})
    with pytest.raises(DataError, match="ambiguous format"):
        detect_format({"messages": [], "prompt": "a", "response": "b"})


BAD = [
    (
        {"messages": [{"role": "assistant", "content": "x"}]},
        "messages",
        "messages[0].role",
        "must be a user turn",
    ),
    ({"text": "### Human: hi"}, "guanaco", "messages[0].role", "ends with a user turn"),
    (
        {"messages": [{"role": "robot", "content": "x"}]},
        "messages",
        "messages[0].role",
        "unknown role 'robot'",
    ),
    (
        {"messages": [{"role": "user", "content": 3}]},
        "messages",
        "messages[0].content",
        "expected a string, got int",
    ),
    ({"messages": [{"role": "user"}]}, "messages", "messages[0].content", "expected a string, got missing"),
    ({"question": Q1}, "openorca", "response", "missing field"),
    ({"question": Q1, "response": ["a"]}, "openorca", "response", "expected a string, got list"),
    ({"text": "### Human: hi### Assistant:   "}, "guanaco", "messages[1].content", "empty assistant content"),
    (
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "system", "content": "b"},
                {"role": "assistant", "content": "c"},
            ]
        },
        "messages",
        "messages[1].role",
        "system message may only come first",
    ),
]


@pytest.mark.parametrize("row,fmt,field,why", BAD)
def test_bad_rows_name_file_row_field(row, fmt, field, why):
    with pytest.raises(DataError) as e:
        to_conversation(row, fmt, source="data.jsonl", row_index=12)
    assert str(e.value) == f"data.jsonl, row 12, field '{field}': " + str(e.value).split(": ", 1)[1]
    assert why in str(e.value)
    assert "\n" not in str(e.value)


def test_jsonl_malformed_line_and_missing_file(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "a", \n')
    rows = load_rows(str(p))
    assert next(rows) == (1, {"prompt": "a", "response": "b"})
    with pytest.raises(DataError, match=r"d\.jsonl, row 3: malformed JSON line"):
        next(rows)
    with pytest.raises(DataError, match=r"nope\.jsonl: file not found"):
        load_rows(str(tmp_path / "nope.jsonl"))
    q = tmp_path / "e.jsonl"
    q.write_text("[1, 2]\n")
    with pytest.raises(DataError, match=r"e\.jsonl, row 1: expected a JSON object, got list"):
        list(load_rows(str(q)))


def test_json_parquet_and_limit(tmp_path):
    rows = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(5)]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    for name in ("d.json", "d.parquet"):
        assert list(load_rows(str(tmp_path / name), limit=2)) == [(1, rows[0]), (2, rows[1])]
        assert len(list(load_rows(str(tmp_path / name)))) == 5


def test_bundled_sample():
    rows = list(load_rows("bundled"))
    assert len(rows) == len(BUNDLED) >= 36
    convs = [to_conversation(r, source="bundled", row_index=i) for i, r in rows]
    assert sum(len(c) > 3 for c in convs) >= 5
    assert sum(c[0]["role"] == "system" for c in convs) >= 5
    assert convs == BUNDLED


def test_hub_offline_is_one_line_error():
    with pytest.raises(DataError, match=r"^no-such-org/no-such-set: cannot load hub dataset"):
        list(load_rows("no-such-org/no-such-set", limit=3))


def test_real_guanaco_files_equal(shared_data):
    """Both real Guanaco files adapt to the same conversations; the only bad rows are 3 empty turns."""

    def adapt(path):
        out, bad = [], {}
        for i, row in load_rows(str(path)):
            try:
                out.append(to_conversation(row, source=path.name, row_index=i))
            except DataError as e:
                bad[i] = e.field
        return out, bad

    g, gbad = adapt(shared_data / "guanaco-1k.jsonl")
    l2, lbad = adapt(shared_data / "guanaco-1k-llama2.parquet")
    # those rows hold an empty turn in both files (the source data splits on '###' inside a reply)
    assert (
        gbad == lbad == {435: "messages[4].content", 511: "messages[2].content", 900: "messages[3].content"}
    )
    assert len(g) == 997
    assert g == l2
    assert sum(len(c) > 2 for c in g) == 350  # 353 multi-turn, minus the 3 bad rows
    assert detect_format(next(load_rows(str(shared_data / "guanaco-1k.jsonl")))[1]) == "guanaco"
    assert detect_format(next(load_rows(str(shared_data / "guanaco-1k-llama2.parquet")))[1]) == "llama2"


def test_messages_keep_the_chat_fields_in_canonical_form():
    """Issue 27: tool calls (OpenAI's JSON-string arguments parsed, flat calls nested), tool results,
    reasoning under any alias, the row's tools and chat_template_kwargs on the first message."""
    tool = {"type": "function", "function": {"name": "add"}}
    row = {
        "tools": json.dumps([tool]),
        "chat_template_kwargs": {"enable_thinking": True},
        "messages": [
            {"role": "user", "content": "2+2? "},
            {"role": "assistant", "content": None, "thinking": " add ", "tool_calls": [
                {"name": "add", "arguments": '{"a": 2, "b": 2}'}]},
            {"role": "tool", "name": "add", "content": "4", "weight": 1},
            {"role": "assistant", "content": "4.", "reasoning": "the tool says 4", "reasoning_content": "the tool says 4"},
        ],
    }  # fmt: skip
    assert to_conversation(row) == [
        {"role": "user", "content": "2+2?", "chat_template_kwargs": {"enable_thinking": True, "tools": [tool]}},
        {"role": "assistant", "content": "", "reasoning_content": "add",
         "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 2}}}]},
        {"role": "tool", "content": "4", "name": "add"},
        {"role": "assistant", "content": "4.", "reasoning_content": "the tool says 4"},
    ]  # fmt: skip


CHAT_BAD = [
    ({"role": "assistant", "content": "x", "thinking": "a", "reasoning_content": "b"}, "messages[1].reasoning_content",
     "disagree"),
    ({"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "{"}}]},
     "messages[1].tool_calls[0].function.arguments", "not valid JSON"),
    ({"role": "assistant", "content": "", "tool_calls": []}, "messages[1].tool_calls", "non-empty list"),
    ({"role": "assistant", "content": ""}, "messages[1].content", "empty assistant content"),
    ({"role": "system", "content": "s", "reasoning_content": "r"}, "messages[1].reasoning_content",
     "reasoning on a 'system' message"),
]  # fmt: skip


@pytest.mark.parametrize("msg,field,why", CHAT_BAD)
def test_bad_chat_fields_name_the_field(msg, field, why):
    row = {"messages": [{"role": "user", "content": "q"}, msg, {"role": "assistant", "content": "a"}]}
    with pytest.raises(DataError) as e:
        to_conversation(row, source="c.jsonl", row_index=4)
    assert str(e.value).startswith(f"c.jsonl, row 4, field '{field}': ") and why in str(e.value), str(e.value)
