from __future__ import annotations

import base64
import struct

import pytest
from google.protobuf.json_format import ParseDict
from google.protobuf.struct_pb2 import Value

from mariana.llm.v1 import llm_pb2 as pb
from mariana_common.errors import InvalidArgument
from services.router.openai_convert import embedding_value, message_text, string_list
from services.router.servicer import chat_request


def value(python: object) -> Value:
    return ParseDict(python, Value())


def test_content_as_string_or_parts() -> None:
    assert message_text(value("hi"), 0) == "hi"
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    assert message_text(value(parts), 0) == "ab"


def test_non_text_parts_are_refused() -> None:
    with pytest.raises(InvalidArgument, match=r"messages\[2\]"):
        message_text(value([{"type": "image_url", "image_url": {"url": "x"}}]), 2)


def test_stop_as_string_or_list() -> None:
    assert string_list(value("END"), "stop") == ["END"]
    assert string_list(value(["a", "b"]), "stop") == ["a", "b"]
    assert string_list(Value(), "stop") == []
    with pytest.raises(InvalidArgument):
        string_list(value(["a", "b", "c", "d", "e"]), "stop", max_items=4)
    with pytest.raises(InvalidArgument):
        string_list(value([1, 2]), "stop")


def test_base64_embedding_is_little_endian_float32() -> None:
    encoded = embedding_value([1.0, -0.5], "base64").string_value
    assert struct.unpack("<2f", base64.b64decode(encoded)) == (1.0, -0.5)
    assert [v.number_value for v in embedding_value([0.25], "float").list_value.values] == [0.25]
    with pytest.raises(InvalidArgument):
        embedding_value([1.0], "hex")


def parse_chat(body: dict[str, object]) -> pb.CreateChatCompletionRequest:
    return ParseDict(body, pb.CreateChatCompletionRequest())


def test_chat_request_maps_openai_fields() -> None:
    request = chat_request(
        parse_chat(
            {
                "model": "m",
                "messages": [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"}],
                "max_completion_tokens": 7,
                "max_tokens": 99,
                "temperature": 0,
                "stop": "END",
                "seed": 5,
            }
        )
    )
    assert request.messages == [("system", "be brief"), ("user", "hi")]
    s = request.sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.stop, s.seed) == (7, 0.0, 1.0, ("END",), 5)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
        ({"model": "m", "messages": []}, "messages"),
        ({"model": "m", "messages": [{"role": "wizard", "content": "x"}]}, "role"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs needs"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
    ],
)
def test_bad_chat_requests_are_invalid(body: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        chat_request(parse_chat(body))
