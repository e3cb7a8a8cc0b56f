"""Shared types and constants of the data path.

One ``IGNORE_INDEX`` for the whole project: a label or target equal to it is never trained on.
A ``Conversation`` is a list of messages ``{"role": ..., "content": ...}`` with roles from
``ROLES``; an optional single ``system`` message comes first, then ``user`` and ``assistant`` turns.
"""

from __future__ import annotations

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")

Message = dict[str, str]
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
