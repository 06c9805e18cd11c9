"""Two platforms up side by side, loaded in alternation: how to compare two
versions (or two settings) on a machine whose speed drifts by 10-25 % over
minutes, which one run after the other cannot do. Each side is
`bench.gateway_overhead --hold` (echo backend, full path) started from a
checkout: this tree, or a git ref checked out into a temporary worktree (it
shares this tree's venv, generated protos and models), with extra environment
of its own. Then wrk phases at a fixed rate go to A, B, A, B, ...; each prints
p50/p99 of the whole path and the CPU per request of every process.

    make bench-tools   # wrk, once
    .venv/bin/python -m bench.side_by_side --a-ref HEAD~1 [--pairs 7] [--rate 300]
    .venv/bin/python -m bench.side_by_side --b-env GRPC_EXPERIMENTS=-event_engine_client
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from bench.gateway_overhead import CpuMeter, wrk_load
from launcher.settings import REPO

# Untracked parts of a checkout that a worktree borrows from this one.
SHARED = (".venv", "gen", "build", ".data")
HOLDING = re.compile(r"holding: edge (\S+), key (\S+);")
WARM_UP_S = 3


@dataclass
class Side:
    name: str
    tree: Path
    env: dict[str, str]
    python: str = sys.executable
    moderation: str = "in_process"
    edge: str = ""
    key: str = ""
    process: subprocess.Popen[str] | None = None
    p50: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)
    cpu: dict[str, list[float]] = field(default_factory=dict)

    def start(self) -> None:
        argv = [self.python, "-u", "-m", "bench.gateway_overhead", "--rates", "", "--paths", "direct", "--hold"]
        argv += ["--moderation", self.moderation]
        env = {**os.environ, **self.env}
        self.process = subprocess.Popen(argv, cwd=self.tree, env=env, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if match := HOLDING.search(line):
                self.edge, self.key = match.groups()
                print(f"{self.name}: up at {self.edge} ({self.tree})", flush=True)
                return
        raise SystemExit(f"{self.name}: the platform did not start (see above)")

    def processes(self) -> dict[str, psutil.Process]:
        assert self.process is not None
        found = {}
        for child in psutil.Process(self.process.pid).children():
            argv = child.cmdline()
            service = next((a.removeprefix("services.") for a in argv if a.startswith("services.")), None)
            name = service or Path(argv[0].split()[0]).name  # redis-server retitles itself "name host:port"
            found[name if name not in found else f"{name}-{child.pid}"] = child  # replicas
        return found

    def phase(self, rate: float, seconds: float) -> str:
        meter = CpuMeter(self.processes())
        before = meter.sample()
        result = wrk_load(self.edge, self.key, rate, seconds, stream=False)
        done = max(1, result["ok"])
        per_request = {n: cpu_s * 1e3 / done for n, cpu_s in CpuMeter.diff(before, meter.sample()).items()}
        self.p50.append(result["p50"])
        self.p99.append(result["p99"])
        for name, ms in per_request.items():
            self.cpu.setdefault(name, []).append(ms)
        cpu = "  ".join(f"{n} {ms:.2f}" for n, ms in sorted(per_request.items()))
        errors = result["errors"] or 0
        return f"p50 {result['p50']:5.2f}  p99 {result['p99']:6.2f} ms  errors {errors}  | CPU ms/req: {cpu}"

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # the hold ends and the platform stops cleanly
            self.process.wait(timeout=120)


@contextlib.contextmanager
def checkout(ref: str | None) -> Iterator[Path]:
    if ref is None:
        yield REPO
        return
    with tempfile.TemporaryDirectory(prefix="mariana-side-") as parent:
        tree = Path(parent) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), ref], cwd=REPO, check=True)
        try:
            for name in SHARED:
                if (REPO / name).exists():
                    (tree / name).symlink_to(REPO / name)
            yield tree
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, check=False)


def environment(pairs: list[str]) -> dict[str, str]:
    return dict(pair.split("=", 1) for pair in pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a-ref", help="git ref for side A (default: this tree)")
    parser.add_argument("--b-ref", help="git ref for side B (default: this tree)")
    parser.add_argument("--a-env", action="append", default=[], metavar="K=V", help="environment of side A")
    parser.add_argument("--b-env", action="append", default=[], metavar="K=V", help="environment of side B")
    parser.add_argument("--a-python", default=sys.executable, help="interpreter of side A's platform (a venv's python)")
    parser.add_argument("--b-python", default=sys.executable, help="interpreter of side B's platform")
    parser.add_argument(
        "--moderation", choices=("in_process", "service"), default="in_process", help="where both sides moderate chat"
    )
    parser.add_argument("--pairs", type=int, default=7)
    parser.add_argument("--rate", type=float, default=300.0, help="req/s of each phase")
    parser.add_argument("--seconds", type=float, default=8.0, help="per phase")
    args = parser.parse_args()
    if not (args.a_ref or args.b_ref or args.a_env or args.b_env or args.a_python != args.b_python):
        parser.error("the sides are the same: give a ref, an environment or an interpreter to one of them")
    with checkout(args.a_ref) as tree_a, checkout(args.b_ref) as tree_b:
        sides = [
            Side("A", tree_a, environment(args.a_env), args.a_python, args.moderation),
            Side("B", tree_b, environment(args.b_env), args.b_python, args.moderation),
        ]
        try:
            for side in sides:
                side.start()
            for side in sides:  # not counted: the first seconds of a platform are slower
                wrk_load(side.edge, side.key, args.rate, WARM_UP_S, stream=False)
            for pair in range(args.pairs):
                for side in sides if pair % 2 == 0 else sides[::-1]:  # each side goes first in turn
                    print(f"{pair + 1:2d} {side.name}: {side.phase(args.rate, args.seconds)}", flush=True)
        finally:
            for side in sides:
                side.stop()
    a, b = sides
    fewer = sum(y < x for x, y in zip(a.p99, b.p99, strict=True))
    print(f"\n{args.pairs} pairs at {args.rate:.0f} req/s, {args.seconds:.0f} s each; medians:")
    for side in sides:
        cpu = "  ".join(f"{n} {statistics.median(v):.2f}" for n, v in sorted(side.cpu.items()))
        print(f"  {side.name}: p50 {statistics.median(side.p50):.2f}  p99 {statistics.median(side.p99):.2f} ms | {cpu}")
    print(f"  B's p99 lower than A's in {fewer} of {args.pairs} pairs")


if __name__ == "__main__":
    main()
