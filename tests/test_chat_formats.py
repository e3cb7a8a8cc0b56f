"""Tool calls, tool results and reasoning through the real chat templates of Qwen2.5-Instruct, Qwen3 and
Llama-3.1-Instruct (tests/fixtures/chat_templates), on small BPE tokenizers with their special tokens.

Pinned: every supervised span decodes to exactly the assistant turn as the template renders it plus its
end-of-turn token (reasoning and tool calls included; tool results, tools and prompts never); Qwen3's
history rewrite gives one extra sample per earlier exchange; the bad inputs of issue 27 are one line
naming file, row and field; packing and the preview carry the new fields.
"""

from __future__ import annotations

import json

import pytest

from sft.data.formats import to_conversation
from sft.data.packing import pack
from sft.data.prepare import prepare_data
from sft.data.render import (
    TemplateError,
    render,
    render_batch,
    render_prompt,
    render_samples,
    stop_token_ids,
)
from sft.data.schema import IGNORE_INDEX, DataError
from tests.chat_fixtures import (
    TEMPLATE_FAMILY,
    WEATHER_TOOL,
    supervised_runs,
    tokenizer_for,
    weather_row,
)

CALL_QWEN = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
# what each template renders for each assistant turn of weather_row, plus its end-of-turn token: by hand
EXPECTED = {
    "qwen2_5_instruct": [
        [CALL_QWEN, "It is sunny and 21 degrees.<|im_end|>", "I cannot tell tomorrow's weather.<|im_end|>"]
    ],
    "qwen3": [
        [
            "<think>\nI should call the tool.\n</think>\n\n" + CALL_QWEN,
            "<think>\nThe tool says sunny.\n</think>\n\nIt is sunny and 21 degrees.<|im_end|>",
        ],
        ["<think>\nNo forecast tool.\n</think>\n\nI cannot tell tomorrow's weather.<|im_end|>"],
    ],
    "llama3_1_instruct": [
        [
            '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
            "It is sunny and 21 degrees.<|eot_id|>",
            "I cannot tell tomorrow's weather.<|eot_id|>",
        ]
    ],
}


def decoded_runs(tok, sample) -> list[str]:
    return [tok.decode(r, skip_special_tokens=False) for r in supervised_runs(sample)]


@pytest.mark.parametrize("name", sorted(TEMPLATE_FAMILY))
def test_supervised_spans_are_the_templates_turns(name):
    tok = tokenizer_for(name)
    conv = to_conversation(weather_row(reasoning=name == "qwen3"), source="chat.jsonl", row_index=1)
    out = render_samples([conv], tok)
    assert [decoded_runs(tok, r.sample) for r in out] == EXPECTED[name]
    for r in out:
        text = tok.decode(r.sample.input_ids, skip_special_tokens=False)
        # the tools and the tool result are in the text, never supervised
        assert "get_weather" in text.split("Weather in Paris?")[0] and "sunny, 21 C" in text
        assert all("sunny, 21 C" not in s and "The weather now" not in s for s in decoded_runs(tok, r.sample))
        # exactly one BOS where the tokenizer uses one (the Llama template writes it itself)
        assert r.sample.input_ids.count(tok.bos_token_id) == (1 if tok.bos_token_id is not None else 0)
        # each supervised run ends with the end-of-turn token
        eot = tok.convert_tokens_to_ids(tok.eos_token)
        assert all(run[-1] == eot for run in supervised_runs(r.sample))
    # every assistant turn supervised exactly once over the samples of the conversation
    assert sorted(t for r in out for t in r.turns) == [2, 4, 6]


def test_qwen3_per_turn_samples_render_the_conversation_prefix():
    """The extra sample is the conversation up to the turn, rendered by the template as it is then; the
    last sample is the whole conversation as the template renders it (earlier reasoning dropped)."""
    tok = tokenizer_for("qwen3")
    conv = to_conversation(weather_row())
    first, last = render_samples([conv], tok)
    assert (first.n_messages, last.n_messages) == (5, 7)
    whole = tok.apply_chat_template([{k: v for k, v in m.items() if k != "chat_template_kwargs"} for m in conv],
                                    tools=[WEATHER_TOOL], tokenize=False)  # fmt: skip
    assert tok.decode(last.sample.input_ids, skip_special_tokens=False) == whole
    assert "I should call the tool" not in whole
    # the per-turn sample's prompt is what inference renders before the model writes turn 4
    prompt = render_prompt(conv[:4], tok)
    assert first.sample.input_ids[: len(prompt)] == prompt
    assert first.sample.labels[len(prompt) - 1] == IGNORE_INDEX != first.sample.labels[len(prompt)]
    # render_batch keeps its one-sample-per-conversation contract and says why it cannot
    with pytest.raises(TemplateError, match="not prefix-stable at message 2"):
        render_batch([conv], tok)


def test_qwen3_plain_multi_turn_and_the_last_turn_policy():
    """A plain two-exchange conversation: Qwen3 renders the empty think block only in the newest turn, so
    the first turn gets its own sample (supervise='all'); supervise='last' keeps one sample."""
    tok = tokenizer_for("qwen3")
    conv = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye"},
    ]
    out = render_samples([conv], tok)
    assert [decoded_runs(tok, r.sample) for r in out] == [
        ["<think>\n\n</think>\n\nHello<|im_end|>"],
        ["<think>\n\n</think>\n\nGoodbye<|im_end|>"],
    ]
    (only,) = render_samples([conv], tok, supervise="last")
    assert decoded_runs(tok, only.sample) == ["<think>\n\n</think>\n\nGoodbye<|im_end|>"]
    assert only.sample.input_ids == out[1].sample.input_ids
    assert render(conv, tok, supervise="last").labels == only.sample.labels


def test_enable_thinking_false_moves_the_empty_think_block_into_the_prompt():
    tok = tokenizer_for("qwen3")
    row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    (r,) = render_samples([to_conversation({**row, "chat_template_kwargs": {"enable_thinking": False}})], tok)
    assert decoded_runs(tok, r.sample) == ["Hello<|im_end|>"]
    assert "<think>\n\n</think>" in tok.decode(r.sample.input_ids)


def test_plain_conversations_are_unchanged_on_prefix_stable_templates():
    """No chat field: one sample, the same as rendering the messages with transformers and masking by hand."""
    for name in ("qwen2_5_instruct", "llama3_1_instruct"):
        tok = tokenizer_for(name)
        conv = [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Goodbye"},
        ]
        s = render(conv, tok)
        assert tok.decode(s.input_ids, skip_special_tokens=False) == tok.apply_chat_template(
            conv, tokenize=False
        )
        eot = "<|im_end|>" if name.startswith("qwen") else "<|eot_id|>"
        assert decoded_runs(tok, s) == ["Hello" + eot, "Goodbye" + eot]


# ----------------------------------------------------------------------------- bad input: one line each

USER = {"role": "user", "content": "Weather?"}
CALL = {
    "role": "assistant",
    "content": "",
    "tool_calls": [{"id": "c1", "function": {"name": "w", "arguments": {}}}],
}
RESULT = {"role": "tool", "tool_call_id": "c1", "content": "sunny"}
ANSWER = {"role": "assistant", "content": "Sunny."}
BAD_ROWS = [
    (
        {"messages": [USER, {**CALL, "tool_calls": [{"function": {"arguments": {}}}]}, RESULT, ANSWER]},
        "qwen2_5_instruct",
        "messages[1].tool_calls[0].function.name",
        "a tool call needs a function name",
    ),
    (
        {"messages": [USER, CALL, {**RESULT, "tool_call_id": "c9"}, ANSWER]},
        "qwen2_5_instruct",
        "messages[2].tool_call_id",
        "a tool message without a matching call",
    ),
    ({"messages": [USER, RESULT, ANSWER]}, "qwen2_5_instruct", "messages[1].role", "without a matching call"),
    (
        {"messages": [{**USER, "thinking": "hmm"}, ANSWER]},
        "qwen3",
        "messages[0].thinking",
        "reasoning on a 'user' message",
    ),
    (
        {"messages": [USER, {**ANSWER, "reasoning_content": "because"}]},
        "qwen2_5_instruct",
        "messages[1].reasoning_content",
        "the chat template ignores this field",
    ),
    ({"messages": [USER, ANSWER], "tools": [WEATHER_TOOL]}, "chatml", "tools", "the chat template ignores"),
    (
        {"messages": [USER, {**CALL, "content": "Let me look."}, RESULT, ANSWER]},
        "llama3_1_instruct",
        "messages[1].content",
        "the chat template ignores this field",
    ),
    (
        {"messages": [USER, ANSWER], "chat_template_kwargs": {"enable_thinking": False}},
        "qwen2_5_instruct",
        "chat_template_kwargs.enable_thinking",
        "the chat template ignores this field",
    ),
    (
        {"messages": [USER, CALL, RESULT, ANSWER]},
        "guanaco",
        "messages[2].role",
        "the guanaco template has no tool role",
    ),
]


@pytest.mark.parametrize("row,name,field,why", BAD_ROWS, ids=[b[2] for b in BAD_ROWS])
def test_bad_rows_one_line_naming_file_row_field(tmp_path, row, name, field, why):
    path = tmp_path / "chat.jsonl"
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    tok = tokenizer_for(name if name in TEMPLATE_FAMILY else "qwen2_5_instruct")
    tmpl = name if name in ("chatml", "guanaco") else None
    with pytest.raises(DataError) as e:
        prepare_data(str(path), tok, template=tmpl, max_len=512, use_cache=False)
    msg = str(e.value)
    assert msg.startswith(f"{path}, row 2, field '{field}': "), msg
    assert why in msg and "\n" not in msg
    # bad_rows=drop: dropped and counted, the good row kept
    p = prepare_data(str(path), tok, template=tmpl, max_len=512, use_cache=False, bad_rows="drop")
    assert p.stats["drops"] == {"bad_row": 1} and len(p.train) == 1


def test_llama_refuses_two_calls_in_one_message_naming_the_row(tmp_path):
    two = {
        **CALL,
        "tool_calls": CALL["tool_calls"] + [{"id": "c2", "function": {"name": "w", "arguments": {}}}],
    }
    path = tmp_path / "chat.jsonl"
    path.write_text(
        json.dumps({"messages": [USER, two, RESULT, {**RESULT, "tool_call_id": "c2"}, ANSWER]}) + "\n"
    )
    with pytest.raises(
        DataError, match=r"chat\.jsonl, row 1: the chat template refused this conversation .*single"
    ):
        prepare_data(str(path), tokenizer_for("llama3_1_instruct"), max_len=512, use_cache=False)


def test_bad_input_exits_2_without_a_run_folder(tmp_path, capsys):
    from sft import preview

    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [USER, {**ANSWER, "reasoning_content": "x"}]}) + "\n")
    folder = tmp_path / "tok"
    tokenizer_for("qwen2_5_instruct").save_pretrained(folder)
    assert preview.main([f"--data={path}", f"--tokenizer={folder}", "--no_cache"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "row 1, field 'messages[1].reasoning_content'" in err


# ----------------------------------------------------------------------------- prepare, packing, preview


def _write(tmp_path, rows):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_prepare_counts_the_per_turn_samples_and_the_chat_fields(tmp_path):
    path = _write(tmp_path, [weather_row(), weather_row()])
    tok = tokenizer_for("qwen3")
    p = prepare_data(str(path), tok, max_len=1024, use_cache=False)
    assert len(p.train) == 4
    assert p.stats["per_turn"] == {"conversations": 2, "extra_samples": 2, "extra_tokens": 2 * 316}
    assert p.stats["chat_fields"] == {
        "tool_calls": 2, "tool_results": 2, "reasoning": 6, "rows_with_template_kwargs": 2
    }  # fmt: skip
    q = prepare_data(str(path), tok, max_len=1024, use_cache=False, supervise="last")
    assert len(q.train) == 2 and q.stats["per_turn"]["extra_samples"] == 0
    assert sum(s.n_supervised for s in q.train) < sum(s.n_supervised for s in p.train)


def test_cut_after_a_turn_keeps_the_samples_turns(tmp_path):
    """An over-long Qwen3 sample is cut after the last of its own turns that fits."""
    tok = tokenizer_for("qwen3")
    path = _write(tmp_path, [weather_row()])
    p = prepare_data(str(path), tok, max_len=300, use_cache=False)  # the 316-token sample is cut after turn 2
    assert p.stats["cut"] == 1 and p.stats["drops"] == {"overlong_first_reply": 1}
    (s,) = p.train
    assert decoded_runs(tok, s) == [EXPECTED["qwen3"][0][0]]


def test_packing_keeps_the_supervised_tokens(tmp_path):
    tok = tokenizer_for("qwen3")
    samples = [r.sample for r in render_samples([to_conversation(weather_row())] * 2, tok)]
    rows = pack(samples, 1024, tok.pad_token_id)
    n_targets = sum(int((r["targets"] != IGNORE_INDEX).sum()) for r in rows)
    # every supervised label becomes a target (none is a document's first token)
    assert n_targets == sum(s.n_supervised for s in samples)
    for r in rows:
        ids, tgt, doc = r["input_ids"], r["targets"], r["document_ids"]
        sup = tgt != IGNORE_INDEX
        assert (tgt[:-1][sup[:-1]] == ids[1:][sup[:-1]]).all()
        assert (doc[1:][sup[:-1]] == doc[:-1][sup[:-1]]).all()  # never across a document


def test_stop_tokens_of_the_real_templates():
    assert stop_token_ids(tokenizer_for("qwen3")) == [
        tokenizer_for("qwen3").convert_tokens_to_ids("<|im_end|>")
    ]
    llama = tokenizer_for("llama3_1_instruct")
    assert stop_token_ids(llama) == [llama.convert_tokens_to_ids("<|eot_id|>")]


def test_preview_shows_the_fields_and_marks_what_is_supervised(tmp_path, capsys):
    from sft import preview

    path = _write(tmp_path, [weather_row()])
    folder = tmp_path / "tok"
    tokenizer_for("qwen3").save_pretrained(folder)
    assert preview.main([f"--data={path}", f"--tokenizer={folder}", "--no_cache", "--n=2"]) == 0
    out = capsys.readouterr().out
    assert "⟦<think>\nI should call the tool.\n</think>\n\n<tool_call>" in out
    assert "⟦<think>\nNo forecast tool.\n</think>\n\nI cannot tell tomorrow's weather.<|im_end|>⟧" in out
    assert "<tool_response>\nsunny, 21 C\n</tool_response>" in out and "⟦sunny" not in out
    assert "chat fields: tool calls 1, tool results 1, reasoning 3, rows with tools/template kwargs 1" in out
    assert "per-turn samples: 1 conversations gave 1 extra samples, 316 extra tokens" in out


def test_preview_supervise_last(tmp_path, capsys):
    from sft import preview

    path = _write(tmp_path, [weather_row()])
    folder = tmp_path / "tok"
    tokenizer_for("qwen3").save_pretrained(folder)
    assert preview.main([f"--data={path}", f"--tokenizer={folder}", "--no_cache", "--supervise=last"]) == 0
    out = capsys.readouterr().out
    assert (
        out.count("⟦") == 2 and "per-turn samples" not in out
    )  # the header's ⟦marked⟧ and one turn and "train samples: 1," in out


@pytest.mark.parametrize("row,field", [(BAD_ROWS[0][0], BAD_ROWS[0][2]), (BAD_ROWS[5][0], "tools")])
def test_trainer_exits_2_without_a_run_folder(tmp_path, capsys, row, field):
    """The trainer's entry point (tiny-llama: ChatML, which has no tools): one error line, exit 2, nothing written."""
    from sft.config import TrainConfig
    from sft.training import trainer

    path = _write(tmp_path, [row])
    out = tmp_path / "runs"
    assert trainer.main(TrainConfig(), ["--model=tiny-llama", f"--data={path}", f"--out_dir={out}"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and f"row 1, field '{field}'" in err[0], err
    assert not any(out.glob("*"))


def test_reasoning_goes_under_the_name_the_template_reads():
    """A template reading ``message.thinking`` (gpt-oss style) gets the reasoning there, whatever the row's alias."""
    tok = tokenizer_for("qwen2_5_instruct")
    tmpl = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n"
        "{% if m.thinking %}<think>{{ m.thinking }}</think>{% endif %}{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    row = {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Yo", "reasoning": "hm"},
        ]
    }
    (r,) = render_samples([to_conversation(row)], tok, tmpl)
    assert decoded_runs(tok, r.sample) == ["<think>hm</think>Yo<|im_end|>"]


def test_supervise_once_trains_every_turn_as_the_whole_conversation_renders_it(tmp_path):
    """supervise='once': one sample, Qwen3's earlier turns supervised where and as it renders them (their
    reasoning dropped as the template drops it, so not refused), no extra tokens."""
    tok = tokenizer_for("qwen3")
    conv = to_conversation(weather_row())
    (r,) = render_samples([conv], tok, supervise="once")
    assert r.turns == [2, 4, 6] and r.n_messages == 7
    assert decoded_runs(tok, r.sample) == [
        CALL_QWEN,
        "It is sunny and 21 degrees.<|im_end|>",
        EXPECTED["qwen3"][1][0],
    ]
    assert r.sample.input_ids == render_samples([conv], tok)[-1].sample.input_ids  # the whole rendering
    p = prepare_data(
        str(_write(tmp_path, [weather_row()])), tok, max_len=1024, use_cache=False, supervise="once"
    )
    assert len(p.train) == 1 and p.stats["per_turn"]["extra_tokens"] == 0
    # prefix-stable templates: the same as 'all'
    for name in ("qwen2_5_instruct", "llama3_1_instruct"):
        tok = tokenizer_for(name)
        conv = to_conversation(weather_row(reasoning=False))
        assert (
            render_samples([conv], tok, supervise="once")[0].sample == render_samples([conv], tok)[0].sample
        )
