"""Personal data found by patterns with checksums where the format has one:
email, phone numbers, payment cards (Luhn), IBANs (ISO 7064 mod 97), IP
addresses, US social security numbers, UK National Insurance numbers, and
Spanish DNI/NIE (check letter)."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator

from services.moderation.spans import Span

EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
# Digit runs never start or end inside a longer run ("1234 5678" is not "5678").
CARD = re.compile(r"(?<![\d-])(?<!\d[ -])\d(?:[ -]?\d){12,18}(?![\d-])(?![ -]\d)")
IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b")
# Not after "version"/"v": 10.0.0.1 there is a release, not an address.
IPV4 = re.compile(r"(?<![\d.])(?<!version )(?<!\bv)(?:\d{1,3}\.){3}\d{1,3}(?![\d.])", re.IGNORECASE)
IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{1,4}:){2,7}(?::|[0-9A-Fa-f]{1,4})(?:[0-9A-Fa-f:]*)(?![\w:])")
SSN = re.compile(r"(?<![\d-])(\d{3})-(\d{2})-(\d{4})(?![\d-])")
NINO = re.compile(r"\b(?!BG|GB|NK|KN|TN|NT|ZZ)[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z] ?\d{2} ?\d{2} ?\d{2} ?[A-D]\b")
DNI = re.compile(r"\b([XYZ]?)(\d{7,8})-?([A-Z])\b")
# International numbers (+CC ...), national ones with a trunk 0, and North
# American (NXX) NXX-XXXX. Separators: space, dot, dash, parentheses.
PHONE = re.compile(
    r"(?<![\w+/-])(?<!\d[ .-])(?:"
    r"\+\d{1,3}[ .-]?(?:\(0?\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{2,4}){1,4}"
    r"|\(0\d{1,4}\)[ .-]?\d{2,4}(?:[ .-]?\d{2,4}){1,3}"
    r"|0\d{1,4}[ .-]\d{2,8}(?:[ .-]\d{2,4}){0,4}"
    r"|\(\d{3}\)[ .-]?\d{3}[ .-]\d{4}"
    r"|\d{3}[.-]\d{3}[.-]\d{4}"
    r")(?![\w-])(?![ .-]\d)"
)
DNI_LETTERS = "TRWAGMYFPDXBNJZSQVHLCKE"


def luhn_valid(digits: str) -> bool:
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char)
        if position % 2 == 1:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def iban_valid(iban: str) -> bool:
    compact = iban.replace(" ", "")
    if not 15 <= len(compact) <= 34:
        return False
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


def dni_valid(prefix: str, number: str, letter: str) -> bool:
    if (prefix and len(number) != 7) or (not prefix and len(number) != 8):
        return False
    value = int(str("XYZ".index(prefix)) + number) if prefix else int(number)
    return DNI_LETTERS[value % 23] == letter


def ssn_valid(area: str, group: str, serial: str) -> bool:
    return area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"


def _spans(pattern: re.Pattern[str], text: str, kind: str) -> Iterator[Span]:
    for match in pattern.finditer(text):
        yield Span("pii", kind, match.start(), match.end())


DIGIT = re.compile(r"\d")


def find_pii(text: str) -> list[Span]:
    """Non-overlapping spans; a stronger (checksummed) finding wins a region."""
    found: list[Span] = []
    # Every pattern but email needs a digit (IPv6 a colon too), email an "@":
    # most prose has none, and then no pattern is run.
    if DIGIT.search(text) is None and "@" not in text and ":" not in text:
        return found

    def add(span: Span) -> None:
        if not any(span.overlaps(other) for other in found):
            found.append(span)

    for span in _spans(EMAIL, text, "email"):
        add(span)
    iban_shaped = []
    for match in IBAN.finditer(text):
        span = Span("pii", "iban", match.start(), match.end())
        if iban_valid(match.group()):
            add(span)
        else:  # a mistyped IBAN: its digits are not a card or a phone number either
            iban_shaped.append(span)
    found += iban_shaped
    for match in CARD.finditer(text):
        digits = re.sub(r"\D", "", match.group())
        if 13 <= len(digits) <= 19 and luhn_valid(digits):
            add(Span("pii", "credit_card", match.start(), match.end()))
    for match in SSN.finditer(text):
        if ssn_valid(*match.groups()):
            add(Span("pii", "us_ssn", match.start(), match.end()))
    for span in _spans(NINO, text, "uk_nino"):
        add(span)
    for match in DNI.finditer(text):
        if dni_valid(*match.groups()):
            add(Span("pii", "es_dni", match.start(), match.end()))
    for match in IPV4.finditer(text):
        if all(int(part) <= 255 for part in match.group().split(".")):
            add(Span("pii", "ip_address", match.start(), match.end()))
    for match in IPV6.finditer(text):
        try:
            ipaddress.IPv6Address(match.group())
        except ValueError:
            continue
        add(Span("pii", "ip_address", match.start(), match.end()))
    for match in PHONE.finditer(text):
        digit_count = sum(c.isdigit() for c in match.group())
        if 7 <= digit_count <= 15:
            add(Span("pii", "phone", match.start(), match.end()))
    return sorted((s for s in found if s not in iban_shaped), key=lambda s: s.start)
