from __future__ import annotations

from services.inference.text_stops import scan_for_stops


def test_no_stops_sends_everything() -> None:
    scan = scan_for_stops("hello world", [])
    assert (scan.safe_end, scan.stopped) == (11, False)


def test_stop_ends_text_before_it() -> None:
    scan = scan_for_stops("one, two, three", [", three", "two"])
    assert scan.stopped
    assert "one, two, three"[: scan.safe_end] == "one, "


def test_partial_stop_is_held_back() -> None:
    # "END" may follow: hold back the "EN" that could begin it.
    scan = scan_for_stops("the EN", ["END"])
    assert (scan.safe_end, scan.stopped) == (4, False)


def test_unrelated_suffix_is_sent() -> None:
    scan = scan_for_stops("the ENx", ["END"])
    assert (scan.safe_end, scan.stopped) == (7, False)


def test_longest_possible_prefix_is_held() -> None:
    scan = scan_for_stops("abcab", ["abcabd", "b"])
    # "b" occurs, so it stops at the first "b".
    assert scan.stopped and scan.safe_end == 1
