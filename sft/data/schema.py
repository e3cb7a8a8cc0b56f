"""Shared types and constants of the data path.

One ``IGNORE_INDEX`` for the whole project: a label or target equal to it is never trained on.
A ``Conversation`` is a list of messages ``{"role": ..., "content": ...}`` with roles from
``ROLES``; an optional single ``system`` message comes first, then ``user`` and ``assistant`` turns.

Messages in the OpenAI / Hugging Face chat format may carry more (``sft.data.formats`` documents the
canonical form): an ``assistant`` message ``REASONING`` (its reasoning text) and ``tool_calls``
(``[{"type": "function", "function": {"name": str, "arguments": dict}, "id"?: str}]``, then its content may
be empty); a ``tool`` message (a tool's result) ``tool_call_id`` and/or ``name``. The row's template
keyword arguments (its ``tools`` list, ``chat_template_kwargs``) ride on the first message under
``TEMPLATE_KWARGS``, so that they survive slicing (``conv[:i]``) and JSON; ``sft.data.render`` takes them off
before the template sees the messages.
"""

from __future__ import annotations

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant", "tool")
# the canonical key of an assistant message's reasoning, and the aliases datasets use for it
REASONING = "reasoning_content"
REASONING_ALIASES = ("reasoning_content", "reasoning", "thinking")
# key of the first message holding the row's chat-template keyword arguments (``tools``, ``enable_thinking``...)
TEMPLATE_KWARGS = "chat_template_kwargs"

Message = dict  # {"role": str, "content": str} plus the optional chat fields above
Conversation = list[Message]


class DataError(ValueError):
    """Bad input data: the message names the file, the row and the field, on one line."""

    def __init__(
        self, message: str, *, source: str | None = None, row: int | None = None, field: str | None = None
    ):
        parts = []
        if source is not None:
            parts.append(str(source))
        if row is not None:
            parts.append(f"row {row}")
        if field is not None:
            parts.append(f"field '{field}'")
        prefix = ", ".join(parts)
        super().__init__(f"{prefix}: {message}" if prefix else message)
        self.source, self.row, self.field = source, row, field
        # the bare message, so that a caller can re-raise it with the source and row filled in
        self.reason = message
