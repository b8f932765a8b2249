"""Render samples as text: alternating prompt / response segments for response-only loss masking.

Templates (``data.template``):

- ``"seed"``: :data:`SEED_TEMPLATE`, the Alpaca-style ``### Instruction:`` / ``### Response:`` layout;
- a custom string with ``{query}`` (and optionally ``{system}``), e.g. ``"Q: {query}\\nA: "``;
- ``"chat"``: the tokenizer's own chat template (``tokenizer.apply_chat_template``), multi-turn.

The chat rendering is split by prefix differences: with ``R(m, gen)`` the template applied to messages
``m`` (``gen`` = add_generation_prompt), assistant turn ``i`` yields

    prompt_i   = R(m[:i], True)[len(R(m[:i_prev + 1], False)):]
    response_i = R(m[:i + 1], False)[len(R(m[:i], True)):]

which requires each rendering to be a prefix of the next; templates that rewrite earlier turns (e.g.
dropping past reasoning) break that and are reported instead of silently mis-masked.
"""

from __future__ import annotations

from typing import Any

from deftune.data.formats import Sample
from deftune.errors import DeftuneError

SEED_TEMPLATE = "### Instruction:\n{query}\n### Response:\n"


def _fill(template: str, query: str, system: str) -> str:
    # str.replace rather than str.format: user templates may hold other braces (JSON examples).
    pattern = SEED_TEMPLATE if template == "seed" else template
    return pattern.replace("{system}", system).replace("{query}", query)


def _with_system(messages: list[dict], system_prompt: str) -> list[dict]:
    if system_prompt and not any(m["role"] == "system" for m in messages):
        return [{"role": "system", "content": system_prompt}, *messages]
    return list(messages)


def _check_chat_template(tokenizer: Any) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise DeftuneError(
            "data.template=chat needs a tokenizer with a chat template, and this tokenizer has none "
            "(base models usually lack one). Use data.template=seed or a custom template with {query}."
        )


def _apply(tokenizer: Any, messages: list[dict], generation_prompt: bool) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    if not isinstance(text, str):
        raise DeftuneError(f"apply_chat_template returned {type(text).__name__}, expected text")
    return text


def _render_chat(sample: Sample, tokenizer: Any, system_prompt: str) -> list[tuple[str, str]]:
    _check_chat_template(tokenizer)
    messages = _with_system(sample.messages, system_prompt)
    segments = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _apply(tokenizer, messages[:i], True)
        full = _apply(tokenizer, messages[: i + 1], False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise DeftuneError(
                f"{sample.source}: the tokenizer's chat template is not prefix-consistent (rendering a "
                f"conversation up to assistant turn {i} does not extend the rendering of the turns "
                "before it), so prompt and response tokens cannot be told apart. Use single-turn "
                "records or data.template=seed / a custom template."
            )
        segments.append((prompt[len(done) :], full[len(prompt) :]))
        done = full
    return segments


def render(sample: Sample, tokenizer: Any, template: str, system_prompt: str = "") -> list[tuple[str, str]]:
    """The sample as ``[(prompt_text, response_text), ...]``, one pair per assistant turn.

    Non-chat templates are single-turn: ``[(template filled with the query, response)]``; ``{system}``
    takes the sample's system message or else ``system_prompt``.
    """
    if template == "chat":
        return _render_chat(sample, tokenizer, system_prompt)
    if not sample.is_single_turn:
        raise DeftuneError(
            f"{sample.source}: a multi-turn conversation cannot be rendered with the single-turn "
            f"template {template!r}; set data.template=chat to use the tokenizer's chat template"
        )
    return [(_fill(template, sample.query, sample.system or system_prompt), sample.response)]


def prompt_for_generation(
    sample_or_query: Sample | str, tokenizer: Any, template: str, system_prompt: str = ""
) -> str:
    """The prompt text that ends where the model's answer starts (for generation and scoring).

    For a sample, the conversation up to its last assistant turn; for a string, a single user turn.
    Special tokens such as BOS are not added here: :func:`deftune.data.tokenize.encode_prompt` does so
    the same way as training.
    """
    if isinstance(sample_or_query, Sample):
        messages = sample_or_query.messages
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        messages = messages[:last]
        source = sample_or_query.source
    else:
        messages = [{"role": "user", "content": sample_or_query}]
        source = "prompt"
    if template == "chat":
        _check_chat_template(tokenizer)
        return _apply(tokenizer, _with_system(messages, system_prompt), True)
    turns = [m for m in messages if m["role"] != "system"]
    if [m["role"] for m in turns] != ["user"]:
        raise DeftuneError(
            f"{source}: a multi-turn conversation cannot be rendered with the single-turn "
            f"template {template!r}; set data.template=chat to use the tokenizer's chat template"
        )
    system = next((m["content"] for m in messages if m["role"] == "system"), "") or system_prompt
    return _fill(template, turns[0]["content"], system)
