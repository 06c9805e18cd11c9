"""Moderation of a model's output while it streams. Text is held back in
windows (cut at whitespace, so a token such as an email address is never split
between two checks) and released only after moderation has seen it: redacted
if the policy says so, or not at all when it says block.

A whole (non-streamed) output is cut into the same windows and checked in one
batch call, each window with the text before it as context, so it gets the
verdicts it would have got streamed, for one round trip instead of one per
window."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from services.router.domain import ModerationVerdict


class ContentFiltered(Exception):
    """The output was blocked; nothing of the offending window was sent."""

    def __init__(self, reasons: tuple[str, ...]) -> None:
        super().__init__(", ".join(reasons))
        self.reasons = reasons


# (window, the text sent before it) -> verdict on the window.
Check = Callable[[str, str], Awaitable[ModerationVerdict]]
# (windows, the text before each) -> a verdict per window.
CheckMany = Callable[[list[str], list[str]], Awaitable[list[ModerationVerdict]]]
CONTEXT_CHARS = 160
# Windows per batch call (the moderation service takes 256 texts at most).
BATCH_WINDOWS = 256


def cut_point(pending: str, size: int) -> int | None:
    """Where the window at the start of `pending` ends: at the last whitespace
    past half the size; None while there is too little text to cut."""
    if len(pending) < size:
        return None
    cut = max(pending.rfind(" ", size // 2), pending.rfind("\n", size // 2))
    if cut < 0:
        if len(pending) < 4 * size:
            return None
        cut = len(pending)  # no whitespace for a long time: check what there is
    return cut


def windows(text: str, first: int, size: int) -> list[str]:
    """`text` cut about as a stream of it would be: the first window about
    `first` characters, the others about `size`, each ending at whitespace."""
    parts: list[str] = []
    current = first
    while len(text) > current:
        head = text[:current]
        cut = max(head.rfind(" ", current // 2), head.rfind("\n", current // 2))
        if cut < 0:  # no whitespace in the second half: the next one, within four windows
            later = [i for i in (text.find(" ", current), text.find("\n", current)) if i > 0]
            cut = min([*later, 4 * current, len(text)])
        parts.append(text[:cut])
        text = text[cut:]
        current = size
    if text:
        parts.append(text)
    return parts


class OutputGuard:
    def __init__(self, check: Check, window_chars: int, check_many: CheckMany | None = None) -> None:
        if window_chars < 2:
            raise ValueError("window_chars must be at least 2")
        self._check = check
        self._check_many = check_many
        self._window = window_chars
        # The first window is half size, so the first text reaches the client
        # sooner; later ones are full size and come with context.
        self._current = max(2, window_chars // 2)
        self._pending = ""
        self._sent = ""

    async def _release(self, text: str) -> str:
        verdict = await self._check(text, self._sent)
        if verdict.action == "block":
            raise ContentFiltered(verdict.reasons)
        released = verdict.redacted_text if verdict.action == "redact" else text
        self._sent = (self._sent + released)[-CONTEXT_CHARS:]
        return released

    async def feed(self, text: str) -> str:
        """The text that may be sent now (possibly empty)."""
        self._pending += text
        cut = cut_point(self._pending, self._current)
        if cut is None:
            return ""
        window, self._pending = self._pending[:cut], self._pending[cut:]
        self._current = self._window
        return await self._release(window)

    async def finish(self) -> str:
        """Whatever is still held back, checked."""
        window, self._pending = self._pending, ""
        return await self._release(window) if window else ""

    async def whole(self, text: str) -> str:
        """A complete output, checked window by window in batch calls: what
        may be sent (redacted where the policy says), or ContentFiltered."""
        if self._check_many is None:
            return await self.feed(text) + await self.finish()
        parts = windows(text, self._current, self._window)
        contexts, seen = [], 0
        for part in parts:
            contexts.append(text[max(0, seen - CONTEXT_CHARS) : seen])
            seen += len(part)
        released = []
        for start in range(0, len(parts), BATCH_WINDOWS):
            batch = parts[start : start + BATCH_WINDOWS]
            verdicts = await self._check_many(batch, contexts[start : start + BATCH_WINDOWS])
            for part, verdict in zip(batch, verdicts, strict=True):
                if verdict.action == "block":
                    raise ContentFiltered(verdict.reasons)
                released.append(verdict.redacted_text if verdict.action == "redact" else part)
        return "".join(released)
