"""Adapters: one raw data row (a dict) -> one canonical ``Conversation``.

A ``Conversation`` (see ``sft.data.schema``) is a list of ``{"role", "content"}`` messages: an optional
single ``system`` message first, then ``user`` / ``assistant`` turns, ending with an ``assistant``
turn (the thing we train on). Every content is a non-empty ``str``.

Whitespace rule (the same for every adapter, so that the Guanaco text and the Llama-2 text of one
conversation give equal conversations): each content is ``str.strip()``-ed, nothing else changes.

Formats (``ADAPTERS`` keys):

- ``guanaco``: ``{"text": "### Human: ...### Assistant: ...### Human: ..."}``, every turn kept.
- ``llama2``: ``{"text": "<s>[INST] <<SYS>>\\n...\\n<</SYS>>\\n\\nq [/INST] a </s><s>[INST] ..."}``.
- ``openorca``: ``{"system_prompt", "question", "response"}`` (empty system prompt -> no system turn).
- ``messages``: ``{"messages": [{"role", "content"}, ...]}`` (OpenAI-style chat JSONL).
- ``prompt_response``: ``{"prompt", "response"}`` plus optional ``"system"``; the column names are
  configurable with ``fields={"prompt": ..., "response": ..., "system": ...}``.

Errors are ``DataError`` naming the source, the row and the field; ``to_conversation`` adds the
source and row to errors raised by the adapters.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

from sft.data.schema import ROLES, Conversation, DataError

_GUANACO_MARK = re.compile(r"### (Human|Assistant):")
_GUANACO_ROLES = {"Human": "user", "Assistant": "assistant"}
_SYS = re.compile(r"^\s*<<SYS>>(.*?)<</SYS>>", re.S)

PROMPT_RESPONSE_FIELDS = {"prompt": "prompt", "response": "response", "system": "system"}


def _keys(row: Mapping) -> list[str]:
    # str() first: a row's keys may mix types (a parquet or Python source), and sorted() would raise
    return sorted(map(str, row))


def _text_field(row: Mapping, field: str, *, optional: bool = False) -> str | None:
    if field not in row or row[field] is None:
        if optional:
            return None
        raise DataError(f"missing field (row has {_keys(row)})", field=field)
    value = row[field]
    if not isinstance(value, str):
        raise DataError(f"expected a string, got {type(value).__name__}", field=field)
    return value


def guanaco(row: Mapping) -> Conversation:
    """``### Human: q### Assistant: a...`` -> turns; text before the first marker is an error."""
    text = _text_field(row, "text")
    parts = _GUANACO_MARK.split(text)
    # split with one group: [before, name, content, name, content, ...]
    if parts[0].strip():
        raise DataError("text before the first '### Human:' marker", field="text")
    if len(parts) < 3:
        raise DataError("no '### Human:' / '### Assistant:' turns", field="text")
    return [
        {"role": _GUANACO_ROLES[name], "content": content.strip()}
        for name, content in zip(parts[1::2], parts[2::2])
    ]


def llama2(row: Mapping) -> Conversation:
    """``<s>[INST] (<<SYS>>s<</SYS>>) q [/INST] a </s>`` per exchange -> turns, system kept."""
    text = _text_field(row, "text")
    conv: Conversation = []
    chunks = text.split("</s>")
    for k, chunk in enumerate(chunks):
        chunk = chunk.strip()
        if not chunk:
            continue
        if chunk.startswith("<s>"):
            chunk = chunk[3:].lstrip()
        if not chunk.startswith("[INST]"):
            raise DataError(f"exchange {k + 1} does not start with '[INST]'", field="text")
        body = chunk[len("[INST]") :]
        if "[/INST]" not in body:
            # a final question without an answer: keep it, validation reports the missing reply
            question, answer = body, None
        else:
            question, answer = body.split("[/INST]", 1)
        if not conv:
            m = _SYS.match(question)
            if m:
                conv.append({"role": "system", "content": m.group(1).strip()})
                question = question[m.end() :]
        conv.append({"role": "user", "content": question.strip()})
        if answer is not None:
            conv.append({"role": "assistant", "content": answer.strip()})
    if not conv:
        raise DataError("no '[INST] ... [/INST]' exchanges", field="text")
    return conv


def openorca(row: Mapping) -> Conversation:
    """OpenOrca columns ``system_prompt`` (optional, may be empty), ``question``, ``response``."""
    system = _text_field(row, "system_prompt", optional=True)
    conv: Conversation = []
    if system is not None and system.strip():
        conv.append({"role": "system", "content": system.strip()})
    conv.append({"role": "user", "content": _text_field(row, "question").strip()})
    conv.append({"role": "assistant", "content": _text_field(row, "response").strip()})
    return conv


def messages(row: Mapping) -> Conversation:
    """OpenAI-style ``{"messages": [{"role": ..., "content": ...}, ...]}``; extra keys ignored."""
    msgs = row.get("messages")
    if not isinstance(msgs, list):
        raise DataError(f"expected a list of messages, got {type(msgs).__name__}", field="messages")
    conv: Conversation = []
    for i, m in enumerate(msgs):
        if not isinstance(m, Mapping):
            raise DataError(f"expected an object, got {type(m).__name__}", field=f"messages[{i}]")
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                got = "missing" if key not in m else type(m[key]).__name__
                raise DataError(f"expected a string, got {got}", field=f"messages[{i}].{key}")
        conv.append({"role": m["role"], "content": m["content"].strip()})
    return conv


def prompt_response(row: Mapping, fields: Mapping[str, str] | None = None) -> Conversation:
    """Plain columns; ``fields`` maps ``prompt``/``response``/``system`` to the row's column names."""
    names = {**PROMPT_RESPONSE_FIELDS, **(fields or {})}
    system = _text_field(row, names["system"], optional=True)
    conv: Conversation = []
    if system is not None and system.strip():
        conv.append({"role": "system", "content": system.strip()})
    conv.append({"role": "user", "content": _text_field(row, names["prompt"]).strip()})
    conv.append({"role": "assistant", "content": _text_field(row, names["response"]).strip()})
    return conv


ADAPTERS: dict[str, Callable[..., Conversation]] = {
    "guanaco": guanaco,
    "openorca": openorca,
    "messages": messages,
    "llama2": llama2,
    "prompt_response": prompt_response,
}


def detect_format(row: Mapping, fields: Mapping[str, str] | None = None) -> str:
    """Name of the adapter for ``row``, from its keys (and the start of ``text``).

    Raises ``DataError`` when no format or more than one format matches; name it explicitly then.
    """
    if not isinstance(row, Mapping):
        raise DataError(f"expected a JSON object, got {type(row).__name__}")
    names = {**PROMPT_RESPONSE_FIELDS, **(fields or {})}
    found = []
    if "messages" in row:
        found.append("messages")
    if "question" in row and "response" in row:
        found.append("openorca")
    if names["prompt"] in row and names["response"] in row:
        found.append("prompt_response")
    text = row.get("text")
    if isinstance(text, str):
        head = text.lstrip()
        if head.startswith("### Human:"):
            found.append("guanaco")
        elif head.startswith("<s>[INST]") or head.startswith("[INST]"):
            found.append("llama2")
    if len(found) == 1:
        return found[0]
    if not found:
        raise DataError(f"unknown format (keys {_keys(row)}); name it with fmt= one of {sorted(ADAPTERS)}")
    raise DataError(f"ambiguous format, matches {found}; name it with fmt=")


def is_encodable(text: str) -> bool:
    """True if ``text`` has no lone surrogate (so UTF-8, and every tokenizer, can encode it)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def validate_conversation(conv: Conversation) -> Conversation:
    """Check the canonical shape; raise ``DataError`` naming the offending message field.

    Rules: at least one turn; roles in ``ROLES``; ``system`` only as the first message; then a ``user``
    turn first; every content a non-empty string that UTF-8 can encode (JSON's ``"\\ud800"`` escapes give
    lone surrogates that no tokenizer accepts); the last message is an ``assistant`` turn.
    """
    if not conv:
        raise DataError("empty conversation")
    for i, m in enumerate(conv):
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise DataError(f"unknown role {role!r} (expected one of {ROLES})", field=f"messages[{i}].role")
        if role == "system" and i != 0:
            raise DataError("a system message may only come first", field=f"messages[{i}].role")
        if not isinstance(content, str):
            raise DataError(
                f"expected a string, got {type(content).__name__}", field=f"messages[{i}].content"
            )
        if not content:
            raise DataError(f"empty {role} content", field=f"messages[{i}].content")
        if not is_encodable(content):
            raise DataError(
                "text is not valid Unicode (a lone surrogate such as '\\ud800'; no tokenizer can encode it)",
                field=f"messages[{i}].content",
            )
    first = 1 if conv[0]["role"] == "system" else 0
    if first < len(conv) and conv[first]["role"] != "user":
        raise DataError(
            "the first turn after the system prompt must be a user turn", field=f"messages[{first}].role"
        )
    if conv[-1]["role"] != "assistant":
        raise DataError(
            f"conversation ends with a {conv[-1]['role']} turn, not an assistant reply",
            field=f"messages[{len(conv) - 1}].role",
        )
    return conv


def to_conversation(
    row: Mapping,
    fmt: str | None = None,
    *,
    source: str | None = None,
    row_index: int | None = None,
    fields: Mapping[str, str] | None = None,
) -> Conversation:
    """Adapt and validate one row. ``fmt=None`` detects it. Errors name ``source``, ``row_index``, field."""
    try:
        if fmt is None:
            fmt = detect_format(row, fields)
        if fmt not in ADAPTERS:
            raise DataError(f"unknown format {fmt!r}; expected one of {sorted(ADAPTERS)}")
        if not isinstance(row, Mapping):
            raise DataError(f"expected a JSON object, got {type(row).__name__}")
        if fmt == "prompt_response":
            conv = prompt_response(row, fields)
        else:
            conv = ADAPTERS[fmt](row)
        return validate_conversation(conv)
    except DataError as e:
        raise DataError(e.reason, source=source, row=row_index, field=e.field) from None
