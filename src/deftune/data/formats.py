"""Normalise raw records of any supported shape into chat-style ``Sample`` objects.

Shapes (``data.format``):

- ``query_response``: ``{"query", "response"}`` with an optional ``"system"``;
- ``alpaca``: ``{"instruction", "input", "output"}`` (Taori et al. 2023, Stanford Alpaca); ``input`` is
  optional, and a non-empty one is appended to the instruction after a blank line;
- ``chat``: ``{"messages": [{"role", "content"}, ...]}`` ending with an assistant turn.

``auto`` picks the shape from the first record's keys; every record is then checked against it, so a
mixed file fails at the first record of another shape, naming its location.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from deftune.errors import DeftuneError

ROLES = ("system", "user", "assistant")
FORMATS = ("query_response", "alpaca", "chat")

# Required and optional fields per shape, as shown in error messages.
REQUIRED = {
    "query_response": ("query", "response"),
    "alpaca": ("instruction", "output"),
    "chat": ("messages",),
}
OPTIONAL = {"query_response": ("system",), "alpaca": ("input",), "chat": ()}


@dataclass
class Sample:
    """One conversation: ``messages`` of ``{"role", "content"}`` dicts, ending with an assistant turn."""

    messages: list[dict]
    source: str

    @property
    def query(self) -> str:
        """Content of the last user message (the prompt a single-turn template shows)."""
        return next(m["content"] for m in reversed(self.messages) if m["role"] == "user")

    @property
    def response(self) -> str:
        """Content of the last assistant message (the reference answer for scoring)."""
        return next(m["content"] for m in reversed(self.messages) if m["role"] == "assistant")

    @property
    def system(self) -> str:
        """The system message's content, or "" when the sample has none."""
        return next((m["content"] for m in self.messages if m["role"] == "system"), "")

    @property
    def has_empty_response(self) -> bool:
        """True when an assistant turn is empty or only whitespace: nothing to learn there but the end of
        the answer, so such samples are skipped (and counted) rather than trained on."""
        return any(m["role"] == "assistant" and not m["content"].strip() for m in self.messages)

    @property
    def is_single_turn(self) -> bool:
        """True when the sample is one user message and one assistant answer (plus an optional system)."""
        return [m["role"] for m in self.messages if m["role"] != "system"] == ["user", "assistant"]


def _fields_text(fmt: str) -> str:
    optional = "".join(f", {name}?" for name in OPTIONAL[fmt])
    return "{" + ", ".join(REQUIRED[fmt]) + optional + "}"


def detect_format(record: dict, location: str) -> str:
    """The shape of ``record`` judged by its keys; an unknown shape is an error listing the options."""
    keys = set(record)
    if "messages" in keys:
        return "chat"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"query", "response"} <= keys:
        return "query_response"
    options = "; ".join(f"{fmt} {_fields_text(fmt)}" for fmt in FORMATS)
    raise DeftuneError(
        f"{location}: cannot tell the record format from its keys {sorted(keys)}. "
        f"Expected one of: {options}. Rename the fields or set data.format."
    )


def _text(record: dict, name: str, location: str, optional: bool = False) -> str:
    value = record.get(name)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise DeftuneError(
            f"{location}: field '{name}' must be a string, got {type(value).__name__} ({value!r:.60})"
        )
    return value


def _check_fields(record: dict, fmt: str, location: str, how: str) -> None:
    missing = [name for name in REQUIRED[fmt] if name not in record]
    if missing:
        raise DeftuneError(
            f"{location}: record does not match the '{fmt}' format ({how}): expected fields "
            f"{_fields_text(fmt)}, missing {', '.join(missing)}; the record has {sorted(record)}"
        )


def _chat_messages(record: dict, location: str) -> list[dict]:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise DeftuneError(f"{location}: 'messages' must be a non-empty list of {{role, content}} objects")
    out = []
    for j, message in enumerate(messages):
        where = f"{location}: messages[{j}]"
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DeftuneError(f"{where} must be an object with 'role' and 'content', got {message!r:.80}")
        role = message["role"]
        if role not in ROLES:
            raise DeftuneError(f"{where}: role must be one of {', '.join(ROLES)}, got {role!r}")
        if role == "system" and j != 0:
            raise DeftuneError(f"{where}: a system message may only come first")
        out.append({"role": role, "content": _text(message, "content", where)})
    if out[-1]["role"] != "assistant":
        raise DeftuneError(
            f"{location}: the conversation must end with an assistant turn (the answer to learn), "
            f"it ends with {out[-1]['role']!r}"
        )
    if not any(m["role"] == "user" for m in out):
        raise DeftuneError(f"{location}: the conversation has no user message")
    return out


def record_to_sample(record: dict, fmt: str, location: str, how: str = "set by data.format") -> Sample:
    """Check one record against shape ``fmt`` and convert it; ``how`` says where ``fmt`` came from."""
    _check_fields(record, fmt, location, how)
    if fmt == "chat":
        return Sample(_chat_messages(record, location), location)
    messages = []
    if fmt == "query_response":
        system = _text(record, "system", location, optional=True)
        query = _text(record, "query", location)
        response = _text(record, "response", location)
    else:
        system = ""
        instruction = _text(record, "instruction", location)
        extra = _text(record, "input", location, optional=True)
        query = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        response = _text(record, "output", location)
    if system:
        messages.append({"role": "system", "content": system})
    messages += [{"role": "user", "content": query}, {"role": "assistant", "content": response}]
    return Sample(messages, location)


def to_samples(records: Iterable[tuple[str, dict[str, Any]]], format: str = "auto") -> list[Sample]:
    """Convert ``(location, record)`` pairs to samples; ``format="auto"`` detects it from the first record."""
    records = list(records)
    if format not in ("auto", *FORMATS):
        raise DeftuneError(f"data.format must be auto, {', '.join(FORMATS)}; got {format!r}")
    if not records:
        return []
    if format == "auto":
        first_location, first = records[0]
        fmt = detect_format(first, first_location)
        how = f"detected from {first_location}"
    else:
        fmt, how = format, "set by data.format"
    return [record_to_sample(record, fmt, location, how) for location, record in records]
