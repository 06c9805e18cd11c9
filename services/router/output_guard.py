"""Moderation of a model's output while it streams. Text is held back in
windows (cut at whitespace, so a token such as an email address is never split
between two checks) and released only after moderation has seen it: redacted
if the policy says so, or not at all when it says block."""

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
CONTEXT_CHARS = 160


class OutputGuard:
    def __init__(self, check: Check, window_chars: int) -> None:
        if window_chars < 2:
            raise ValueError("window_chars must be at least 2")
        self._check = check
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
        size = self._current
        if len(self._pending) < size:
            return ""
        cut = max(self._pending.rfind(" ", size // 2), self._pending.rfind("\n", size // 2))
        if cut < 0:
            if len(self._pending) < 4 * size:
                return ""
            cut = len(self._pending)  # no whitespace for a long time: check what there is
        window, self._pending = self._pending[:cut], self._pending[cut:]
        self._current = self._window
        return await self._release(window)

    async def finish(self) -> str:
        """Whatever is still held back, checked."""
        window, self._pending = self._pending, ""
        return await self._release(window) if window else ""
