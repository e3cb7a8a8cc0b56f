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

import json
import re
from collections.abc import Callable, Mapping

from sft.data.schema import (
    REASONING,
    REASONING_ALIASES,
    ROLES,
    TEMPLATE_KWARGS,
    Conversation,
    DataError,
)

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


def _reasoning(m: Mapping, i: int) -> str | None:
    """The message's reasoning under any alias (``REASONING_ALIASES``); aliases that disagree are an error."""
    found = {k: m[k] for k in REASONING_ALIASES if m.get(k) is not None}
    for k, v in found.items():
        if not isinstance(v, str):
            raise DataError(f"expected a string, got {type(v).__name__}", field=f"messages[{i}].{k}")
    if len({v.strip() for v in found.values()}) > 1:
        raise DataError(
            f"the reasoning aliases {sorted(found)} disagree", field=f"messages[{i}].{next(iter(found))}"
        )
    return next(iter(found.values())).strip() if found else None


def _tool_calls(calls, i: int) -> list[dict]:
    """OpenAI / HF tool calls -> ``[{"type": "function", "function": {"name", "arguments": dict}, "id"?}]``.

    A call may be ``{"function": {...}}`` or flat ``{"name", "arguments"}``; ``arguments`` given as a JSON
    string (OpenAI's form) is parsed to an object, as the chat templates expect (they ``tojson`` it).
    """
    where = f"messages[{i}].tool_calls"
    if not isinstance(calls, list) or not calls:
        got = "an empty list" if isinstance(calls, list) else type(calls).__name__
        raise DataError(f"expected a non-empty list of tool calls, got {got}", field=where)
    out = []
    for j, call in enumerate(calls):
        f = f"{where}[{j}]"
        if not isinstance(call, Mapping):
            raise DataError(f"expected an object, got {type(call).__name__}", field=f)
        fn = call.get("function", call)
        if not isinstance(fn, Mapping):
            raise DataError(f"expected an object, got {type(fn).__name__}", field=f"{f}.function")
        name = fn.get("name")
        if not isinstance(name, str) or not name.strip():
            got = "missing" if name is None else repr(name) if isinstance(name, str) else type(name).__name__
            raise DataError(f"a tool call needs a function name, got {got}", field=f"{f}.function.name")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except (ValueError, RecursionError):
                raise DataError("arguments are not valid JSON", field=f"{f}.function.arguments") from None
        if not isinstance(args, Mapping):
            raise DataError(
                f"arguments must be a JSON object, got {type(args).__name__}", field=f"{f}.function.arguments"
            )
        canon: dict = {"type": "function", "function": {"name": name.strip(), "arguments": dict(args)}}
        if call.get("id") is not None:
            if not isinstance(call["id"], str):
                raise DataError(f"expected a string, got {type(call['id']).__name__}", field=f"{f}.id")
            canon["id"] = call["id"]
        out.append(canon)
    return out


def _template_kwargs(row: Mapping) -> dict:
    """The row's ``tools`` (a list, or its JSON text) and ``chat_template_kwargs`` (an object), merged."""
    kwargs: dict = {}
    extra = row.get(TEMPLATE_KWARGS)
    if extra is not None:
        if not isinstance(extra, Mapping) or not all(isinstance(k, str) for k in extra):
            raise DataError(f"expected an object, got {type(extra).__name__}", field=TEMPLATE_KWARGS)
        kwargs.update(extra)
    tools = row.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except (ValueError, RecursionError):
            raise DataError("tools are not valid JSON", field="tools") from None
    if tools is not None:
        if not isinstance(tools, list) or not all(isinstance(t, Mapping) for t in tools):
            raise DataError(f"expected a list of tool objects, got {type(tools).__name__}", field="tools")
        if tools:
            kwargs["tools"] = [dict(t) for t in tools]
    return {k: v for k, v in kwargs.items() if v is not None}


def messages(row: Mapping) -> Conversation:
    """OpenAI / Hugging Face chat rows: ``{"messages": [...], "tools"?: [...], "chat_template_kwargs"?: {...}}``.

    Each message keeps ``role`` and ``content`` (stripped), and, in canonical form: an assistant's reasoning
    (``reasoning_content``, or the aliases ``reasoning`` / ``thinking``, stored as ``reasoning_content``) and
    ``tool_calls`` (see :func:`_tool_calls`; the content may then be empty or ``null``); a tool message's
    ``tool_call_id`` and ``name``. The row's ``tools`` and ``chat_template_kwargs`` go to the first message
    under ``TEMPLATE_KWARGS`` (see ``sft.data.schema``). Other keys (a row's ``id``, a message's ``weight``...)
    are ignored, as before; a plain row gives exactly ``{"role", "content"}`` messages.
    """
    msgs = row.get("messages")
    if not isinstance(msgs, list):
        raise DataError(f"expected a list of messages, got {type(msgs).__name__}", field="messages")
    conv: Conversation = []
    for i, m in enumerate(msgs):
        if not isinstance(m, Mapping):
            raise DataError(f"expected an object, got {type(m).__name__}", field=f"messages[{i}]")
        calls = m.get("tool_calls")
        if not isinstance(m.get("role"), str):
            got = "missing" if "role" not in m else type(m["role"]).__name__
            raise DataError(f"expected a string, got {got}", field=f"messages[{i}].role")
        content = m.get("content")
        if content is None and calls:  # OpenAI writes null content beside tool calls
            content = ""
        if not isinstance(content, str):
            got = "missing" if "content" not in m else type(content).__name__
            raise DataError(f"expected a string, got {got}", field=f"messages[{i}].content")
        msg: dict = {"role": m["role"], "content": content.strip()}
        reasoning = _reasoning(m, i)
        if reasoning is not None and m["role"] != "assistant":
            alias = next(k for k in REASONING_ALIASES if m.get(k) is not None)
            raise DataError(f"reasoning on a {m['role']!r} message (only assistant messages reason)",
                            field=f"messages[{i}].{alias}")  # fmt: skip
        if reasoning:
            msg[REASONING] = reasoning
        if calls is not None:
            msg["tool_calls"] = _tool_calls(calls, i)
        if m["role"] == "tool":
            for key in ("tool_call_id", "name"):
                if m.get(key) is not None:
                    if not isinstance(m[key], str):
                        raise DataError(
                            f"expected a string, got {type(m[key]).__name__}", field=f"messages[{i}].{key}"
                        )
                    msg[key] = m[key]
        conv.append(msg)
    kwargs = _template_kwargs(row)
    if kwargs and conv:
        conv[0][TEMPLATE_KWARGS] = kwargs
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


def check_chat_fields(conv) -> None:
    """The rules of the chat fields (``sft.data.schema``), raising ``DataError`` naming the message field.

    Reasoning and ``tool_calls`` only on assistant messages, every call with a function name; a ``tool``
    message answers a call of the nearest assistant message before it (only tool messages in between): by
    ``tool_call_id`` when it has one, else by ``name``, else by position; ``TEMPLATE_KWARGS`` only on the first
    message. A conversation without these fields passes unchanged.
    """
    calls: list[dict] | None = None  # the calls that the current run of tool messages may answer
    call_at = -1
    answered: list[bool] = []
    for i, m in enumerate(conv):
        role = m.get("role")
        for key in REASONING_ALIASES:
            if m.get(key) is not None and role != "assistant":
                raise DataError(
                    f"reasoning on a {role!r} message (only assistant messages reason)",
                    field=f"messages[{i}].{key}",
                )
        if TEMPLATE_KWARGS in m and i != 0:
            raise DataError("template keyword arguments belong to the first message", field=f"messages[{i}]")
        if "tool_calls" in m:
            if role != "assistant":
                raise DataError(f"tool calls on a {role!r} message", field=f"messages[{i}].tool_calls")
            tc = m["tool_calls"]
            if not isinstance(tc, list) or not tc:
                raise DataError("expected a non-empty list of tool calls", field=f"messages[{i}].tool_calls")
            for j, c in enumerate(tc):
                fn = c.get("function", c) if isinstance(c, Mapping) else None
                name = fn.get("name") if isinstance(fn, Mapping) else None
                if not isinstance(name, str) or not name:
                    raise DataError(
                        "a tool call needs a function name",
                        field=f"messages[{i}].tool_calls[{j}].function.name",
                    )
            calls, call_at, answered = tc, i, [False] * len(tc)
            continue
        if role == "tool":
            if calls is None:
                raise DataError(
                    "a tool message without a matching call (no assistant message with tool_calls before it)",
                    field=f"messages[{i}].role",
                )
            fns = [c.get("function", c) for c in calls]
            tid, name = m.get("tool_call_id"), m.get("name")
            if tid is not None:
                hits = [j for j, c in enumerate(calls) if c.get("id") == tid]
                what, field = f"tool_call_id {tid!r}", "tool_call_id"
            elif name is not None:
                hits = [j for j, f in enumerate(fns) if f.get("name") == name and not answered[j]]
                what, field = f"name {name!r}", "name"
            else:
                hits = [answered.index(False)] if False in answered else []
                what, field = "position", "role"
            if not hits:
                raise DataError(
                    f"a tool message without a matching call ({what} matches no call of messages[{call_at}])",
                    field=f"messages[{i}].{field}",
                )
            answered[hits[0]] = True
            continue
        calls = None


def validate_conversation(conv: Conversation) -> Conversation:
    """Check the canonical shape; raise ``DataError`` naming the offending message field.

    Rules: at least one turn; roles in ``ROLES``; ``system`` only as the first message; then a ``user``
    turn first; every content a string that UTF-8 can encode (JSON's ``"\\ud800"`` escapes give lone
    surrogates that no tokenizer accepts), non-empty except an assistant message with tool calls and a tool
    result; the chat fields' rules (:func:`check_chat_fields`); the last message is an ``assistant`` turn.
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
        if not content and not (role == "tool" or m.get("tool_calls")):
            raise DataError(f"empty {role} content", field=f"messages[{i}].content")
        if not is_encodable(content) or not is_encodable(json.dumps(_extras(m), ensure_ascii=False)):
            raise DataError(
                "text is not valid Unicode (a lone surrogate such as '\\ud800'; no tokenizer can encode it)",
                field=f"messages[{i}].content",
            )
    check_chat_fields(conv)
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


def _extras(m: Mapping) -> dict:
    """A message's fields other than role and content (its reasoning, tool calls, template kwargs...)."""
    return {k: v for k, v in m.items() if k not in ("role", "content")}


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
