"""Shared by the chat-format tests: the real chat templates (tests/fixtures/chat_templates, see its README),
a small byte-level BPE tokenizer per template family with that family's special tokens, and one
conversation with a system prompt, reasoning, tool calls, tool results and a second user turn."""

from __future__ import annotations

import functools
from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures" / "chat_templates"
TEMPLATE_FAMILY = {"qwen2_5_instruct": "qwen", "qwen3": "qwen", "llama3_1_instruct": "llama"}
SPECIAL = {
    "qwen": [
        "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>", "<think>", "</think>",
        "<tool_response>", "</tool_response>",
    ],
    "llama": [
        "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
        "<|eom_id|>", "<|python_tag|>",
    ],
}  # fmt: skip


def template(name: str) -> str:
    return (FIXTURES / f"{name}.jinja").read_text(encoding="utf-8")


@functools.cache
def small_bpe(family: str):
    """A byte-level BPE of 700 tokens trained in memory on the templates' own text (deterministic), with the
    family's special tokens; Llama's adds ``<|begin_of_text|>`` as Llama-3's tokenizer does, Qwen's none."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        special_tokens=SPECIAL[family],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [p.read_text(encoding="utf-8") for p in sorted(FIXTURES.glob("*.jinja"))]
    corpus += ["What is the weather in Paris? It is sunny, 21 degrees. Let me call the weather tool."] * 5
    tok.train_from_iterator(corpus, trainer)
    if family == "qwen":
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>"
        )
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token="<|eot_id|>", pad_token="<|end_of_text|>"
    )


def tokenizer_for(name: str):
    """The small tokenizer of ``name``'s family, with the template attached as its own."""
    import copy

    tok = copy.deepcopy(small_bpe(TEMPLATE_FAMILY[name]))
    tok.chat_template = template(name)
    return tok


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather now",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def weather_row(reasoning: bool = True) -> dict:
    """A row in the OpenAI / HF chat format: system, user, a tool call (with reasoning), its result, an answer
    (with reasoning), a second user turn and an answer (reasoning under the alias ``thinking``)."""
    msgs = [
        {"role": "system", "content": "You are a weather bot."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "reasoning_content": "I should call the tool.",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "sunny, 21 C"},
        {
            "role": "assistant",
            "content": "It is sunny and 21 degrees.",
            "reasoning_content": "The tool says sunny.",
        },
        {"role": "user", "content": "Thanks! And tomorrow?"},
        {
            "role": "assistant",
            "content": "I cannot tell tomorrow's weather.",
            "thinking": "No forecast tool.",
        },
    ]
    if not reasoning:
        msgs = [{k: v for k, v in m.items() if k not in ("reasoning_content", "thinking")} for m in msgs]
    return {"messages": msgs, "tools": [WEATHER_TOOL]}


def supervised_runs(sample) -> list[list[int]]:
    """The maximal runs of supervised token ids of ``sample``."""
    runs, cur = [], []
    for i, lab in zip(sample.input_ids, sample.labels, strict=True):
        if lab != -100:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return runs
