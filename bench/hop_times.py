"""Where a request's time went, hop by hop, from Envoy's access log.

Every line of the log says when a request began (`start_s`), how long it
spent before it went upstream (`before_upstream_us`), how long the upstream
took to answer (`upstream_us`) and how long it took in all (`duration_us`).
The edge logs every request; the inner hops (Envoy's mesh listeners) only
failed or slow ones, unless the runtime key `mesh_access_log.min_duration_ms`
is set to 0 on the admin port, as `HopLog` does. A chat request's edge line
and its inference hop's line share the request id, so its time splits into:

  edge        the edge before the router: receiving, auth's check, the transcoder
  router      the router's own part: the edge's upstream time less the inference hop
  mesh        Envoy's inner hop, both ways (the router -> inference listener)
  inference   the inference service's answer, as the inner hop saw it
  edge out    the edge after the router's answer: transcoding back, the Lua, sending

    python -m bench.hop_times .data/logs/envoy.log [--since EPOCH_S] [--until EPOCH_S]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

INNER_LOG_RUNTIME_KEY = "mesh_access_log.min_duration_ms"
INFERENCE_HOP = "mesh_inference"
PARTS = ("edge", "router", "mesh", "inference", "edge_out")


@dataclass(frozen=True)
class Hops:
    """One request's time (ms) and its parts, which add up to it."""

    start_s: float
    total: float
    edge: float
    router: float
    mesh: float
    inference: float
    edge_out: float


def _timings(line: dict[str, object]) -> tuple[float, float, float, float] | None:
    try:
        start = float(str(line["start_s"]))
        before, upstream, total = (
            int(str(line[k])) / 1e3 for k in ("before_upstream_us", "upstream_us", "duration_us")
        )
    except (KeyError, ValueError):  # a field Envoy left "-": the request never went upstream, or was cut
        return None
    return start, before, upstream, total


def hops_of(lines: Iterable[str]) -> list[Hops]:
    """Requests with both an edge line and an inference hop line, split."""
    edge: dict[str, tuple[float, float, float, float]] = {}
    inner: dict[str, tuple[float, float, float, float]] = {}
    for raw in lines:
        try:
            line = json.loads(raw)
        except ValueError:  # a line cut at the offset where reading began
            continue
        timings = _timings(line)
        if timings is None:
            continue
        listener, request_id = line.get("listener"), str(line.get("request_id"))
        if listener == "edge":
            edge[request_id] = timings
        elif listener == INFERENCE_HOP:
            inner[request_id] = timings
    found = []
    for request_id, (start, before, upstream, total) in edge.items():
        if request_id not in inner:
            continue
        _, _, hop_upstream, hop_total = inner[request_id]
        found.append(
            Hops(
                start_s=start,
                total=total,
                edge=before,
                router=upstream - hop_total,
                mesh=hop_total - hop_upstream,
                inference=hop_upstream,
                edge_out=total - before - upstream,
            )
        )
    return found


def table(requests: list[Hops]) -> str:
    """Medians of each part: of all requests, of those between p90 and p99 of
    the total, and of the slowest 1 %."""
    if not requests:
        return "    (no request with both an edge and an inference hop line)"
    ordered = sorted(requests, key=lambda h: h.total)
    n = len(ordered)
    groups = {"all": ordered, "p90-p99": ordered[n * 90 // 100 : n * 99 // 100], "slowest 1%": ordered[n * 99 // 100 :]}
    rows = [f"    {'requests (ms, medians)':<24} {'n':>6} " + " ".join(f"{p:>9}" for p in ("total", *PARTS))]
    for label, group in groups.items():
        if not group:
            continue
        medians = [statistics.median(getattr(h, p) for h in group) for p in ("total", *PARTS)]
        rows.append(f"    {label:<24} {len(group):>6} " + " ".join(f"{m:>9.2f}" for m in medians))
    return "\n".join(rows)


def within(requests: list[Hops], since: float, until: float) -> list[Hops]:
    return [h for h in requests if since <= h.start_s < until]


class HopLog:
    """Turns on the inner hops' log of every request (an admin runtime key, no
    restart) and reads the log over a window of time."""

    def __init__(self, log: Path, admin_port: int) -> None:
        self._log = log
        url = f"http://127.0.0.1:{admin_port}/runtime_modify?{INNER_LOG_RUNTIME_KEY}=0"
        with urllib.request.urlopen(urllib.request.Request(url, method="POST"), timeout=5) as answer:
            if answer.status != 200:
                raise RuntimeError(f"Envoy refused the runtime change: {answer.status}")
        self._offset = 0
        self._since = 0.0

    def start(self) -> None:
        self._offset = self._log.stat().st_size
        self._since = time.time()

    def report(self, flush_wait_s: float = 12.0) -> str:
        """The table of the window since `start`. Envoy writes its log in
        buffers (flushed every 10 s at the latest): it waits until a request
        begun after the window is in the file, or `flush_wait_s`."""
        until = time.time()
        deadline = time.monotonic() + flush_wait_s
        while True:
            with self._log.open() as file:
                file.seek(self._offset)
                lines = file.readlines()
            requests = hops_of(lines)
            if any(h.start_s >= until for h in requests) or time.monotonic() > deadline:
                return table(within(requests, self._since, until))
            time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("log", type=Path, help="Envoy's log (the launcher's logs/envoy.log)")
    parser.add_argument("--since", type=float, default=0.0, help="epoch seconds")
    parser.add_argument("--until", type=float, default=float("inf"), help="epoch seconds")
    args = parser.parse_args()
    with args.log.open() as file:
        print(table(within(hops_of(file), args.since, args.until)))


if __name__ == "__main__":
    main()
