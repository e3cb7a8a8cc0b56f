"""Exact token ids and labels of rendered conversations, for every template kind and adapter."""

import pytest
from tokenizers.processors import TemplateProcessing
from transformers import PreTrainedTokenizerFast

from sft.data.formats import to_conversation
from sft.data.render import (
    TEMPLATES,
    TemplateError,
    attach_template,
    end_of_turn_text,
    render,
    render_batch,
    render_prompt,
    resolve_template,
    stop_token_ids,
)
from sft.data.schema import IGNORE_INDEX

EOS = "<|endoftext|>"
SYS, Q1, A1, Q2, A2 = "Be brief", "What is two plus two", "Four", "And three plus three", "Six\n\n  of course"
CONV = [
    {"role": "user", "content": Q1},
    {"role": "assistant", "content": A1},
    {"role": "user", "content": Q2},
    {"role": "assistant", "content": A2},
]
CONV_SYS = [{"role": "system", "content": SYS}, *CONV]

# A tokenizer's own template (Llama-2 like, no generation prompt: the user turn ends with [/INST]).
OWN = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ '<<SYS>>' + m['content'] + '<</SYS>>' }}"
    "{% elif m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
)


def pieces(template, conv):
    """Expected text as (piece, supervised) pairs, written by hand per template."""
    out = []
    if template == "chatml":
        for m in conv:
            if m["role"] == "assistant":
                out += [
                    ("<|im_start|>assistant\n", False),
                    (m["content"] + "<|im_end|>", True),
                    ("\n", False),
                ]
            else:
                out.append((f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n", False))
    elif template == "guanaco":
        for m in conv:
            if m["role"] == "assistant":
                out += [("### Assistant:", False), (" " + m["content"] + EOS, True)]
            else:
                out.append(
                    (("### System: " if m["role"] == "system" else "### Human: ") + m["content"], False)
                )
    else:  # OWN
        for m in conv:
            if m["role"] == "assistant":
                out.append((" " + m["content"] + EOS, True))
            elif m["role"] == "system":
                out.append((f"<<SYS>>{m['content']}<</SYS>>", False))
            else:
                out.append((f"[INST] {m['content']} [/INST]", False))
    return out


def expected(tok, template, conv):
    ids, labels = [], []
    for text, sup in pieces(template, conv):
        part = tok(text, add_special_tokens=False)["input_ids"]
        ids += part
        labels += part if sup else [IGNORE_INDEX] * len(part)
    return ids, labels


@pytest.fixture(scope="module")
def own_tok(shared_data):
    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(shared_data / "gpt-neox-20b-tokenizer.json"),
        eos_token=EOS,
        bos_token=EOS,
        unk_token=EOS,
        pad_token=EOS,  # pad == eos: EOS labels must stay supervised
    )
    tok.chat_template = OWN
    return tok


@pytest.mark.parametrize("template", ["chatml", "guanaco", None])
@pytest.mark.parametrize("conv", [CONV, CONV_SYS], ids=["nosys", "sys"])
def test_exact_ids_and_labels(neox_tokenizer, own_tok, template, conv):
    tok = own_tok if template is None else neox_tokenizer
    s = render(conv, tok, template)
    ids, labels = expected(tok, template or "own", conv)
    assert s.input_ids == ids
    assert s.labels == labels
    # supervised runs decode to exactly each reply plus its end-of-turn marker
    runs, cur = [], []
    for i, lab in zip(s.input_ids, s.labels):
        if lab != IGNORE_INDEX:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    marker = {"chatml": "<|im_end|>", "guanaco": EOS, None: EOS}[template]
    lead = "" if template == "chatml" else " "
    assert [tok.decode(r) for r in runs] == [lead + A1 + marker, lead + A2 + marker]


def test_pinned_ids_guanaco(neox_tokenizer):
    """Literal ids, so a change in tokenization or template shows up here too."""
    s = render(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
        neox_tokenizer,
        "guanaco",
    )
    assert s.input_ids == [4118, 8801, 27, 17459, 4118, 17762, 27, 24387, 0]
    assert s.labels == [-100] * 7 + [24387, 0]


def test_every_adapter_renders_exactly(neox_tokenizer):
    rows = {
        "guanaco": {"text": f"### Human: {Q1}### Assistant: {A1}### Human: {Q2}### Assistant: {A2}"},
        "llama2": {
            "text": f"<s>[INST] <<SYS>>\n{SYS}\n<</SYS>>\n\n{Q1} [/INST] {A1} </s><s>[INST] {Q2} [/INST] {A2} </s>"
        },
        "messages": {"messages": CONV_SYS},
        "openorca": {"system_prompt": SYS, "question": Q1, "response": A1},
        "prompt_response": {"prompt": Q1, "response": A1},
    }
    want = {
        "guanaco": CONV,
        "llama2": CONV_SYS,
        "messages": CONV_SYS,
        "openorca": CONV_SYS[:3],
        "prompt_response": CONV[:2],
    }
    for fmt, row in rows.items():
        s = render(to_conversation(row, fmt), neox_tokenizer, "guanaco")
        ids, labels = expected(neox_tokenizer, "guanaco", want[fmt])
        assert (s.input_ids, s.labels) == (ids, labels), fmt


def test_exactly_one_bos(shared_data):
    """A tokenizer that adds BOS: prepended once; a template that writes BOS itself: not doubled."""
    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(shared_data / "gpt-neox-20b-tokenizer.json"),
        eos_token=EOS,
        bos_token="<|padding|>",
        pad_token="<|padding|>",
    )
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="<|padding|> $A", special_tokens=[("<|padding|>", 1)]
    )
    assert tok("a")["input_ids"][0] == 1
    conv = CONV[:2]
    s = render(conv, tok, "guanaco")
    ids, labels = expected(tok, "guanaco", conv)
    assert s.input_ids == [1, *ids] and s.labels == [IGNORE_INDEX, *labels]
    with_bos = "{{ bos_token }}" + TEMPLATES["guanaco"]
    s2 = render(conv, tok, with_bos)
    assert s2.input_ids == [1, *ids] and s2.labels == [IGNORE_INDEX, *labels]
    assert render_prompt(conv[:1], tok, with_bos) == s2.input_ids[: len(s2.input_ids) - 2]


@pytest.mark.parametrize("template", ["chatml", "guanaco"])
def test_render_prompt_is_training_prefix(neox_tokenizer, template):
    full = render(CONV_SYS, neox_tokenizer, template)
    prompt = render_prompt(CONV_SYS[:-1], neox_tokenizer, template)
    assert full.input_ids[: len(prompt)] == prompt
    # the prompt ends in the unsupervised generation prompt; the reply starts right after it
    assert full.labels[len(prompt) - 1] == IGNORE_INDEX
    assert full.labels[len(prompt)] != IGNORE_INDEX


def test_stop_tokens_and_markers(neox_tokenizer, own_tok):
    assert stop_token_ids(neox_tokenizer, "guanaco") == [0]
    assert end_of_turn_text(neox_tokenizer, "chatml") == "<|im_end|>"
    # <|im_end|> is several tokens in GPT-NeoX: no single stop id beyond EOS
    assert stop_token_ids(neox_tokenizer, "chatml") == [0]
    assert stop_token_ids(own_tok) == [0]


def test_template_resolution(neox_tokenizer, own_tok):
    assert resolve_template(own_tok, None) == OWN
    assert resolve_template(neox_tokenizer, "chatml") == TEMPLATES["chatml"]
    assert resolve_template(neox_tokenizer, "{{ 'x' }}") == "{{ 'x' }}"
    with pytest.raises(TemplateError, match="no chat template"):
        resolve_template(neox_tokenizer, None)
    with pytest.raises(TemplateError, match="unknown template 'nope'"):
        resolve_template(neox_tokenizer, "nope")


def test_attach_template_saved(neox_tokenizer, tmp_path):
    import copy

    tok = copy.copy(neox_tokenizer)
    attach_template(tok, "guanaco")
    tok.save_pretrained(tmp_path)
    loaded = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    assert loaded.chat_template == TEMPLATES["guanaco"]
    assert render(CONV, loaded).input_ids == render(CONV, neox_tokenizer, "guanaco").input_ids


def test_not_prefix_stable_refused(neox_tokenizer):
    # shows only the last message: rendering a prefix is not a prefix of the whole
    bad = "{{ messages[-1]['content'] }}"
    with pytest.raises(TemplateError, match="not prefix-stable"):
        render(CONV, neox_tokenizer, bad)


def test_cut_points(neox_tokenizer):
    samples, cuts = render_batch([CONV_SYS], neox_tokenizer, "guanaco")
    first = render(CONV_SYS[:3], neox_tokenizer, "guanaco")
    assert cuts[0] == [len(first), len(samples[0])]
    assert samples[0].input_ids[: cuts[0][0]] == first.input_ids


def test_render_samples_is_render_batch_for_plain_conversations(neox_tokenizer):
    """Issue 27: on plain conversations and a prefix-stable template, one sample each, as render_batch."""
    from sft.data.render import render_samples

    for template in ("chatml", "guanaco"):
        out = render_samples([CONV, CONV_SYS], neox_tokenizer, template)
        samples, cuts = render_batch([CONV, CONV_SYS], neox_tokenizer, template)
        assert [r.sample for r in out] == samples and [r.cuts for r in out] == cuts
        assert [(r.conversation, r.n_messages, r.turns) for r in out] == [(0, 4, [1, 3]), (1, 5, [2, 4])]
        last = render_samples([CONV], neox_tokenizer, template, supervise="last")[0].sample
        assert last.input_ids == samples[0].input_ids
        assert last.labels[: cuts[0][0]] == [IGNORE_INDEX] * cuts[0][0]
        assert last.labels[cuts[0][0] :] == samples[0].labels[cuts[0][0] :]
