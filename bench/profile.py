"""A py-spy profile of one service while a benchmark phase runs: samples taken
only while the process holds the GIL (its Python and Cython work, gRPC's and
the event loop's included), folded into the functions that took the most of
it, as a share of the samples and as microseconds per request. Samples are
wall-clock: on a busy machine a thread holding the GIL also waits for a core,
so the microseconds overstate CPU time (bench/gateway_overhead.py measures
that); the shares are what to read."""

from __future__ import annotations

import collections
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

RATE_HZ = 100


@dataclass(frozen=True)
class Frame:
    function: str
    place: str  # file (and line, for the innermost frame)


def parse_frame(raw: str) -> Frame:
    """py-spy's raw frame: `function (path/to/file.py:line)`."""
    function, _, rest = raw.partition(" (")
    return Frame(function, rest.rstrip(")"))


class Profile:
    def __init__(self, pid: int, seconds: float) -> None:
        spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if not Path(spy).exists():
            raise SystemExit("py-spy is not installed: run `make bench-tools`")
        self._out = Path(tempfile.mkdtemp()) / "profile.txt"
        argv = [spy, "record", "--pid", str(pid), "--duration", str(max(1, int(seconds))), "--rate", str(RATE_HZ)]
        argv += ["--gil", "--nonblocking", "--format", "raw", "--output", str(self._out)]
        self._process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def report(self, requests: int, top: int = 40) -> str:
        self._process.wait(timeout=120)
        if not self._out.exists():
            return "(py-spy wrote no profile: is ptrace allowed here?)"
        inclusive: collections.Counter[str] = collections.Counter()
        own: collections.Counter[str] = collections.Counter()
        samples = 0
        for line in self._out.read_text().splitlines():
            stack, _, count_text = line.rpartition(" ")
            count = int(count_text)
            samples += count
            frames = [parse_frame(f) for f in stack.split(";")]
            innermost = frames[-1]
            own[f"{innermost.function} ({innermost.place})"] += count
            # A function counted once per sample, however deep it recurses.
            for name in {f"{f.function} ({f.place.rsplit(':', 1)[0]})" for f in frames}:
                inclusive[name] += count
        per_request_us = 1e6 / RATE_HZ / max(1, requests)
        lines = [f"{samples} samples holding the GIL ({samples / RATE_HZ:.1f} s wall), {requests} requests"]
        for title, counter in (("inclusive", inclusive), ("own", own)):
            lines.append(f"| {title} | share | µs per request |")
            lines.append("|---|---|---|")
            for name, count in counter.most_common(top):
                lines.append(f"| {name} | {count / samples:.1%} | {count * per_request_us:.0f} |")
        return "\n".join(lines)
