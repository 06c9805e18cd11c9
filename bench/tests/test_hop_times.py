"""The split of a request's time by hop, from access-log lines as Envoy writes them."""

from __future__ import annotations

import json

import pytest

from bench.hop_times import hops_of, table, within


def line(listener: str, request_id: str, start_s: float, before: object, upstream: object, total: object) -> str:
    return json.dumps(
        {
            "listener": listener,
            "request_id": request_id,
            "start_s": f"{start_s:.6f}",
            "before_upstream_us": before,
            "upstream_us": upstream,
            "duration_us": total,
        }
    )


def test_a_request_splits_into_parts_that_add_up_to_its_time() -> None:
    # Edge: 400 µs before the router, router answered in 1,800 µs, 2,300 in all;
    # inference hop: 1,000 µs in all, 900 of them inference's.
    lines = [line("edge", "a", 100.0, 400, 1800, 2300), line("mesh_inference", "a", 100.001, 30, 900, 1000)]

    (hops,) = hops_of(lines)

    assert (hops.edge, hops.router, hops.mesh, hops.inference, hops.edge_out) == pytest.approx(
        (0.4, 0.8, 0.1, 0.9, 0.1)
    )
    assert hops.edge + hops.router + hops.mesh + hops.inference + hops.edge_out == pytest.approx(hops.total)


def test_requests_without_both_lines_or_with_unset_fields_are_left_out() -> None:
    lines = [
        line("edge", "only-edge", 1.0, 400, 1800, 2300),  # a cached answer: inference never called
        line("edge", "refused", 2.0, "-", "-", 300),  # auth refused it: it never went upstream
        line("mesh_inference", "refused", 2.0, 30, 900, 1000),
        '{"listener": "edge", "request_id": "cut',  # the line reading began in the middle of
        line("edge", "b", 3.0, 400, 1800, 2300),
        line("mesh_billing", "b", 3.0, 10, 100, 150),  # another inner hop
        line("mesh_inference", "b", 3.0, 30, 900, 1000),
    ]

    assert [h.start_s for h in hops_of(lines)] == [3.0]


def test_the_table_takes_the_window_and_shows_the_slowest_percent_apart() -> None:
    lines = []
    for i in range(200):
        slow = i in (50, 150)
        router_us = 9000 if slow else 800
        lines.append(line("edge", str(i), 10.0 + i / 100, 400, 1000 + router_us, 1500 + router_us))
        lines.append(line("mesh_inference", str(i), 10.0 + i / 100, 30, 900, 1000))

    requests = within(hops_of(lines), since=10.0, until=12.0)
    rows = {r.split()[0]: r.split() for r in table(requests).splitlines()[1:]}

    assert len(requests) == 200
    assert rows["all"][1:4] == ["200", "2.30", "0.40"]  # n, total, edge
    assert rows["p90-p99"][1:5] == ["18", "2.30", "0.40", "0.80"]  # n, total, edge, router
    assert rows["slowest"][2:6] == ["2", "10.50", "0.40", "9.00"]
    assert within(hops_of(lines), since=11.0, until=12.0)[0].start_s == pytest.approx(11.0)
