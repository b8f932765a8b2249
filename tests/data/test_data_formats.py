"""to_samples: shape detection, normalisation to messages, and field errors naming the location."""

from __future__ import annotations

import pytest

from deftune.data import Sample, to_samples
from deftune.errors import DeftuneError


def recs(*records):
    return [(f"f.jsonl:{i}", r) for i, r in enumerate(records, 1)]


def test_query_response_with_optional_system():
    (plain, with_system) = to_samples(
        recs({"query": "q", "response": "r"}, {"query": "q2", "response": "r2", "system": "be brief"})
    )
    assert plain.messages == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]
    assert with_system.messages[0] == {"role": "system", "content": "be brief"}
    assert (with_system.query, with_system.response, with_system.source) == ("q2", "r2", "f.jsonl:2")


def test_alpaca_input_joined_only_when_non_empty():
    samples = to_samples(
        recs(
            {"instruction": "Translate", "input": "bonjour", "output": "hello"},
            {"instruction": "Say hi", "input": "", "output": "hi"},
            {"instruction": "Say bye", "output": "bye"},
            {"instruction": "Null input", "input": None, "output": "ok"},
        )
    )
    assert [s.query for s in samples] == ["Translate\n\nbonjour", "Say hi", "Say bye", "Null input"]
    assert samples[0].response == "hello"


def test_chat_detected_and_validated():
    messages = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "u2"},
        {"role": "assistant", "content": "a2"},
    ]
    (sample,) = to_samples(recs({"messages": messages}))
    assert sample.messages == messages
    assert (sample.query, sample.response, sample.system) == ("u2", "a2", "s")
    assert not sample.is_single_turn


@pytest.mark.parametrize(
    "messages, match",
    [
        ([{"role": "user", "content": "u"}], "must end with an assistant turn"),
        ([{"role": "user", "content": "u"}, {"role": "bot", "content": "a"}], r"messages\[1\]: role must be"),
        ([{"role": "user", "content": "u"}, {"role": "assistant", "content": 3}], r"'content' must be a str"),
        ([{"role": "user"}, {"role": "assistant", "content": "a"}], r"messages\[0\] must be an object"),
        ([], "non-empty list"),
    ],
)
def test_bad_chat_records(messages, match):
    with pytest.raises(DeftuneError, match=match):
        to_samples(recs({"messages": messages}))


def test_missing_field_names_location_format_and_fields():
    with pytest.raises(DeftuneError) as info:
        to_samples(recs({"query": "q", "response": "r"}, {"query": "q only"}))
    message = str(info.value)
    assert message.startswith("f.jsonl:2:")
    assert "'query_response'" in message and "detected from f.jsonl:1" in message
    assert "{query, response, system?}" in message and "missing response" in message


def test_explicit_format_mismatch():
    with pytest.raises(
        DeftuneError, match=r"f.jsonl:1:.*'alpaca'.*set by data.format.*missing instruction, output"
    ):
        to_samples(recs({"query": "q", "response": "r"}), format="alpaca")


def test_undetectable_record():
    with pytest.raises(
        DeftuneError, match=r"f.jsonl:1: cannot tell the record format.*'completion', 'prompt'"
    ):
        to_samples(recs({"prompt": "p", "completion": "c"}))


def test_non_string_value_names_field_and_location():
    with pytest.raises(DeftuneError, match=r"f.jsonl:1: field 'response' must be a string, got int"):
        to_samples(recs({"query": "q", "response": 42}))


def test_sample_is_plain_dataclass():
    sample = Sample([{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}], "x:1")
    assert sample.is_single_turn and sample.system == ""
