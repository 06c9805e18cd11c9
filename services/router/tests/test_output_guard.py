from __future__ import annotations

import re

import pytest

from services.router.domain import ModerationVerdict
from services.router.output_guard import ContentFiltered, OutputGuard, windows

checked: list[str] = []


contexts: list[str] = []


async def fake_check(text: str, context: str) -> ModerationVerdict:
    """Blocks 'forbidden', redacts emails: enough to drive the guard."""
    checked.append(text)
    contexts.append(context)
    if "forbidden" in text:
        return ModerationVerdict(True, {}, {}, "block", ("blocklist (term)",))
    redacted = re.sub(r"\S+@\S+", "[EMAIL]", text)
    return ModerationVerdict(redacted != text, {}, {}, "redact" if redacted != text else "allow", (), redacted)


async def run(pieces: list[str], window: int = 16) -> str:
    guard = OutputGuard(fake_check, window)
    out = [await guard.feed(p) for p in pieces]
    return "".join(out) + await guard.finish()


async def test_text_passes_through_whole() -> None:
    pieces = ["The quick ", "brown fox ", "jumps over ", "the lazy dog."]
    assert await run(pieces) == "".join(pieces)


async def test_nothing_is_released_before_it_is_checked() -> None:
    checked.clear()
    guard = OutputGuard(fake_check, 16)
    released = await guard.feed("short")
    assert released == "" and checked == []
    released = await guard.feed(" text that is long enough")
    assert released and all(released in c for c in checked[-1:])


async def test_email_split_across_pieces_is_redacted_whole() -> None:
    pieces = ["write to ", "bob.sm", "ith@exam", "ple.com ", "today please"]
    text = await run(pieces, window=12)
    assert "bob" not in text and "[EMAIL]" in text and text.endswith("today please")


async def test_block_raises_and_withholds_the_window() -> None:
    guard = OutputGuard(fake_check, 16)
    sent = await guard.feed("a perfectly fine sentence ")
    with pytest.raises(ContentFiltered) as blocked:
        for piece in ["and then ", "something forbidden ", "appears here "]:
            sent += await guard.feed(piece)
        sent += await guard.finish()
    assert "forbidden" not in sent
    assert blocked.value.reasons == ("blocklist (term)",)


async def test_long_text_without_spaces_is_still_checked() -> None:
    checked.clear()
    text = await run(["x" * 100], window=16)
    assert text == "x" * 100 and checked


async def test_each_window_is_checked_with_what_was_sent_before() -> None:
    contexts.clear()
    text = await run(["first part of it ", "and then the second ", "and a third piece "], window=16)
    assert contexts[0] == ""
    assert contexts[1] and text.startswith(contexts[1])


async def fake_check_many(texts: list[str], preceding: list[str]) -> list[ModerationVerdict]:
    return [await fake_check(t, c) for t, c in zip(texts, preceding, strict=True)]


@pytest.mark.parametrize(
    "text",
    [
        "Write to me at someone@example.com or at other@example.org whenever you like, friend.",
        "x" * 150 + " tail",
        "short",
    ],
)
async def test_a_whole_output_gets_the_verdicts_a_stream_of_it_gets(text: str) -> None:
    streamed = await run(list(text), window=16)
    whole = await OutputGuard(fake_check, 16, fake_check_many).whole(text)
    assert whole == streamed
    assert "".join(windows(text, 8, 16)) == text


async def test_a_whole_output_is_checked_with_each_window_in_context() -> None:
    checked.clear()
    contexts.clear()
    text = "The quick brown fox jumps over the lazy dog and then it runs far away."
    await OutputGuard(fake_check, 16, fake_check_many).whole(text)
    assert len(checked) > 2 and "".join(checked) == text
    assert contexts[0] == ""
    for window, context in zip(checked[1:], contexts[1:], strict=True):
        assert text.index(window) == len(context) or context.endswith(text[: text.index(window)][-160:])


async def test_a_whole_output_with_a_blocked_window_is_refused() -> None:
    with pytest.raises(ContentFiltered):
        await OutputGuard(fake_check, 16, fake_check_many).whole("all fine here but this is forbidden text, sorry")
