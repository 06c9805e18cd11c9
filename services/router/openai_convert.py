"""OpenAI request fields that accept more than one JSON shape, read from the
google.protobuf.Value they arrive in."""

from __future__ import annotations

import base64
import struct

from google.protobuf.struct_pb2 import ListValue, Value

from mariana_common.errors import InvalidArgument


def _kind(value: Value) -> str | None:
    return value.WhichOneof("kind")


def message_text(content: Value, index: int) -> str:
    """`content` is a string or a list of parts; only text parts are accepted."""
    kind = _kind(content)
    if kind == "string_value":
        return content.string_value
    if kind is None or kind == "null_value":
        return ""
    if kind == "list_value":
        texts = []
        for part in content.list_value.values:
            fields = part.struct_value.fields if _kind(part) == "struct_value" else {}
            if fields.get("type", Value()).string_value != "text":
                raise InvalidArgument(f"messages[{index}].content: only text parts are supported")
            texts.append(fields["text"].string_value if "text" in fields else "")
        return "".join(texts)
    raise InvalidArgument(f"messages[{index}].content must be a string or a list of text parts")


def string_list(value: Value, field: str, max_items: int | None = None) -> list[str]:
    """A string or a list of strings (absent means empty)."""
    kind = _kind(value)
    if kind is None or kind == "null_value":
        return []
    if kind == "string_value":
        items = [value.string_value]
    elif kind == "list_value":
        if any(_kind(v) != "string_value" for v in value.list_value.values):
            raise InvalidArgument(f"{field} must be a string or a list of strings")
        items = [v.string_value for v in value.list_value.values]
    else:
        raise InvalidArgument(f"{field} must be a string or a list of strings")
    if max_items is not None and len(items) > max_items:
        raise InvalidArgument(f"{field} takes at most {max_items} entries")
    return items


def embedding_value(vector: list[float], encoding_format: str) -> Value:
    if encoding_format in ("", "float"):
        return Value(list_value=ListValue(values=[Value(number_value=x) for x in vector]))
    if encoding_format == "base64":
        packed = struct.pack(f"<{len(vector)}f", *vector)
        return Value(string_value=base64.b64encode(packed).decode())
    raise InvalidArgument("encoding_format must be 'float' or 'base64'")
