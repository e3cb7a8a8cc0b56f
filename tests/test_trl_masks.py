"""An outside check: the project's masks against TRL 1.16's ``assistant_only_loss`` masks.

TRL masks with the template's ``{% generation %}`` markers (``apply_chat_template(...,
return_assistant_tokens_mask=True)``, through ``trl.data_utils._tokenize`` as its ``SFTTrainer`` calls it, then
``labels[assistant_masks == 0] = -100``). Where the markers follow the project's rule (the reply and its
end-of-turn marker, not the newline after it), the masks must be equal token for token:

- ChatML and Guanaco with markers placed by the rule, on the bundled conversations (byte tokenizer) and on
  the 997 usable Guanaco conversations of ../shared/data (GPT-NeoX tokenizer, when present);
- Qwen2.5-Instruct and Qwen3 through TRL's own training templates (``get_training_chat_template``), whose
  markers also take the newline after ``<|im_end|>`` (and, Qwen2.5's, the one that ends the turn's
  generation prompt): TRL's mask equals ours plus exactly those newline tokens (tool calls and reasoning included). Qwen3 is compared on a
  single exchange, where TRL's template (a ``<think>`` block in every turn) renders what Qwen3's own does.
- Llama-3.1-Instruct: TRL refuses it for ``assistant_only_loss`` (no training template), pinned here.
"""

from __future__ import annotations

import pytest

pytest.importorskip("trl")

from sft.data.formats import to_conversation  # noqa: E402
from sft.data.render import CHATML, GUANACO, render, render_samples  # noqa: E402
from sft.data.sample_data import BUNDLED  # noqa: E402
from sft.data.schema import IGNORE_INDEX, TEMPLATE_KWARGS  # noqa: E402
from sft.data.sources import load_rows  # noqa: E402
from sft.model.models import byte_tokenizer, without_torchao  # noqa: E402
from tests.chat_fixtures import tokenizer_for, weather_row  # noqa: E402

CHATML_MARKED = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
GUANACO_MARKED = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '### System: ' + message['content'] }}"
    "{% elif message['role'] == 'user' %}{{ '### Human: ' + message['content'] }}"
    "{% else %}{{ '### Assistant:' }}{% generation %}{{ ' ' + message['content'] + eos_token }}{% endgeneration %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:' }}{% endif %}"
)


def trl_labels(tok, conv, template, tools=None):
    """TRL's input ids and labels for one conversation (its SFTTrainer's tokenize step and label rule)."""
    with without_torchao():
        from trl.data_utils import _tokenize

    msgs = [{k: v for k, v in m.items() if k != TEMPLATE_KWARGS} for m in conv]
    out = _tokenize(tok, msgs, chat_template=template, tools=tools, return_assistant_tokens_mask=True)
    ids = list(out["input_ids"])
    return ids, [i if m else IGNORE_INDEX for i, m in zip(ids, out["assistant_masks"])]


def test_marked_templates_render_what_the_plain_ones_do():
    tok = byte_tokenizer()
    for plain, marked in ((CHATML, CHATML_MARKED), (GUANACO, GUANACO_MARKED)):
        for conv in BUNDLED[:5]:
            assert render(conv, tok, plain) == render(conv, tok, marked)


def _compare(tok, convs, marked):
    bos = tok.bos_token_id
    for conv in convs:
        ours = render(conv, tok, marked)
        ids, labels = trl_labels(tok, conv, marked)
        if bos is not None and ours.input_ids[:1] == [bos] and ids[:1] != [bos]:
            ids, labels = [bos, *ids], [IGNORE_INDEX, *labels]
        assert (ours.input_ids, ours.labels) == (ids, labels)


@pytest.mark.parametrize("marked", [CHATML_MARKED, GUANACO_MARKED], ids=["chatml", "guanaco"])
def test_bundled_masks_equal_trl(marked):
    _compare(byte_tokenizer(), BUNDLED, marked)


@pytest.mark.parametrize("marked", [CHATML_MARKED, GUANACO_MARKED], ids=["chatml", "guanaco"])
def test_shared_guanaco_masks_equal_trl(shared_data, neox_tokenizer, marked):
    convs = []
    for i, row in load_rows(str(shared_data / "guanaco-1k.jsonl")):
        try:
            convs.append(to_conversation(row, row_index=i))
        except ValueError:  # the 3 rows with an empty turn
            continue
    assert len(convs) == 997
    _compare(neox_tokenizer, convs, marked)


def _newlines_around_runs(tok, ids, labels, before: bool):
    """Our labels plus the newline token right after (and, with ``before``, right before) each supervised run."""
    nl = tok.convert_tokens_to_ids(tok.tokenize("\n"))
    assert len(nl) == 1
    out = list(labels)
    for j in range(len(ids)):
        sup = labels[j] != IGNORE_INDEX
        if before and sup and j > 0 and labels[j - 1] == IGNORE_INDEX and ids[j - 1] == nl[0]:
            out[j - 1] = ids[j - 1]
        if sup and j + 1 < len(ids) and labels[j + 1] == IGNORE_INDEX and ids[j + 1] == nl[0]:
            out[j + 1] = ids[j + 1]
    return out


@pytest.mark.parametrize("name, n_messages, before", [("qwen2_5_instruct", 7, True), ("qwen3", 5, False)])
def test_qwen_masks_equal_trl_plus_its_newlines(name, n_messages, before):
    with without_torchao():
        from trl.chat_template_utils import get_training_chat_template

    tok = tokenizer_for(name)
    training = get_training_chat_template(tok)
    assert training is not None and "generation" in training
    row = weather_row(reasoning=name == "qwen3")
    conv = to_conversation(row)[:n_messages]
    (ours,) = render_samples([conv], tok)
    assert ours.turns == [i for i, m in enumerate(conv) if m["role"] == "assistant"]
    ids, labels = trl_labels(tok, conv, training, tools=row["tools"])
    assert ids == ours.sample.input_ids
    assert labels == _newlines_around_runs(tok, ids, ours.sample.labels, before)
    assert labels != ours.sample.labels  # TRL does supervise those newlines


def test_trl_refuses_llama_3_1_for_assistant_only_loss():
    with without_torchao():
        from trl.chat_template_utils import get_training_chat_template

    with pytest.raises(ValueError, match="not training-compatible"):
        get_training_chat_template(tokenizer_for("llama3_1_instruct"))
