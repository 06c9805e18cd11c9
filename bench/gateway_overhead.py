"""What the gateway adds to every request: the whole platform started with the
echo inference backend (answers at once, 16 tokens in chunks of 4), driven at
fixed rates and at saturation by load generators in their own processes, and
the echo backend driven directly the same way, so the added latency is a
difference within one run.

Paths measured (all loopback):
  direct gRPC  the load generator -> inference (mTLS): Complete, the unary call the router makes for a
               whole answer; `direct gRPC stream`: Generate, the stream it makes for a streamed one
  edge gRPC    -> Envoy (h2c) -> ext_authz auth -> router (input and output moderated in process; with
               `--moderation service` by the moderation service via Envoy) -> inference (mTLS via Envoy);
               budget reservation and usage in Redis, the ledger in billing
  edge HTTP    wrk, HTTP/1.1 JSON through Envoy's transcoder, same path; unary and `"stream": true`

For each it prints achieved req/s, p50/p90/p99, errors, and the CPU each
process used (per request, and as a share of one core). The added latency of a
path is its figure minus the direct call's of the same kind (whole or
streamed) in the same round. Both load generators time a request from when it
went out; the gRPC one also says how late against its schedule calls went out.

    make bench-tools   # wrk (Debian) and py-spy, once
    .venv/bin/python -m bench.gateway_overhead [--seconds 8] [--rates 100,300,1000]
"""

from __future__ import annotations

import argparse
import json
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
import redis
import yaml
from pydantic import SecretStr

from bench.common import MODEL, MODEL_DIR, issue_key
from bench.grpc_load import MEASURING
from bench.hop_times import HopLog
from bench.profile import Profile
from launcher.settings import REPO, LauncherSettings
from launcher.stack import Stack
from mesh.plan import free_port
from mesh.topology import DEFAULT_FILE as DEFAULT_TOPOLOGY
from services.billing.events import UsageStreamSettings

SATURATION_CONCURRENCY = 32


@dataclass
class Result:
    path: str
    rate: str
    ok: int
    errors: str
    rps: float
    p50: float
    p90: float
    p99: float
    cpu_s: dict[str, float]
    seconds: float
    # Usage events billing had not applied when the phase ended (it works off
    # the request path, from the Redis Stream, and can fall behind).
    backlog: int = 0


class CpuMeter:
    """CPU seconds (user + system) of each process of a platform over a phase."""

    def __init__(self, processes: dict[str, psutil.Process]) -> None:
        self._processes = processes

    @classmethod
    def of(cls, stack: Stack) -> CpuMeter:
        return cls({p.name: psutil.Process(p.pid) for p in stack.processes})

    def sample(self) -> dict[str, float]:
        times = {name: p.cpu_times() for name, p in self._processes.items()}
        used = {name: t.user + t.system for name, t in times.items()}
        # The load generators are this process's children, waited for.
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        used["load generator"] = children.ru_utime + children.ru_stime
        return used

    @staticmethod
    def diff(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        return {name: after[name] - before[name] for name in after}


Mark = Callable[[], None]


def grpc_load(
    target: str, call: str, rate: float, seconds: float, warmup: float, mark: Mark, key: str = "", tls_dir: str = ""
) -> dict:
    """`mark` is called when the load generator's warm-up ends."""
    argv = [sys.executable, "-m", "bench.grpc_load", "--target", target, "--call", call, "--model", MODEL]
    argv += ["--rate", str(rate), "--seconds", str(seconds), "--concurrency", str(SATURATION_CONCURRENCY)]
    argv += ["--warmup", str(warmup)]
    argv += ["--key", key] if key else []
    argv += ["--tls-dir", tls_dir] if tls_dir else []
    with subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, text=True) as process:
        assert process.stdout is not None
        lines = []
        for line in process.stdout:
            if line.strip() == MEASURING:
                mark()
            lines.append(line)
        if process.wait(timeout=seconds + warmup + 120) != 0:
            raise subprocess.CalledProcessError(process.returncode, argv)
    return dict(json.loads(lines[-1]))


def wrk_load(edge: str, key: str, rate: float, seconds: float, stream: bool) -> dict:
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("wrk is not installed: run `make bench-tools`")
    connections = SATURATION_CONCURRENCY if rate == 0 else max(16, int(rate / 20))
    argv = [wrk, "-t1", f"-c{connections}", f"-d{int(seconds)}s", "--timeout", "10s", "-s", "bench/wrk_chat.lua"]
    argv += [f"http://{edge}/v1/chat/completions", "--", key, str(rate), "1" if stream else "0"]
    out = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=seconds + 60, check=True)
    line = next(x for x in out.stdout.splitlines() if x.startswith("{"))
    raw = json.loads(line)
    errors = {k: raw[k] for k in ("connect", "read", "write", "status", "timeout") if raw[k]}
    ok = raw["sent"] - sum(errors.values())
    return {
        "sent": raw["sent"],
        "ok": ok,
        "errors": errors,
        "rps": ok / (raw["duration_us"] / 1e6),
        "p50": raw["p50"],
        "p90": raw["p90"],
        "p99": raw["p99"],
    }


def wrk_warmed(edge: str, key: str, rate: float, seconds: float, warmup: float, mark: Mark, stream: bool) -> dict:
    """A wrk run of `warmup` seconds at the same rate, then the measured one
    (a few milliseconds apart: wrk starts at once)."""
    warm = wrk_load(edge, key, rate, warmup, stream) if warmup >= 1 else None
    mark()
    raw = wrk_load(edge, key, rate, seconds, stream)
    if warm is not None:
        raw["warmup"] = {"ok": warm["ok"], "errors": warm["errors"], "p99": warm["p99"]}
    return raw


class BillingBacklog:
    """Usage events in the stream that billing's consumer group has not
    acknowledged: not yet read (lag) plus read and not yet applied (pending)."""

    def __init__(self, redis_port: int) -> None:
        self._redis = redis.Redis(host="127.0.0.1", port=redis_port)
        self._stream = UsageStreamSettings().usage_stream

    def events(self) -> int:
        try:
            groups = self._redis.xinfo_groups(self._stream)
        except redis.ResponseError:  # no stream yet: nothing was generated
            return 0
        return sum(int(g.get("lag") or 0) + int(g.get("pending") or 0) for g in groups)


def measure(
    meter: CpuMeter,
    backlog: BillingBacklog,
    path: str,
    rate: float,
    load: Callable[[Mark], dict],
    hops: HopLog | None = None,
) -> Result:
    """One phase. `load` calls its mark when the warm-up is over: the platform's
    CPU (and with `hops`, the access log) counts from there."""
    before, started = meter.sample(), time.perf_counter()

    def mark() -> None:
        nonlocal before, started
        before, started = meter.sample(), time.perf_counter()
        if hops is not None:
            hops.start()

    raw = load(mark)
    elapsed = time.perf_counter() - started
    cpu = CpuMeter.diff(before, meter.sample())
    if "cpu_s" in raw:  # the generator's own, counted part only (a child's rusage comes whole)
        cpu["load generator"] = raw["cpu_s"]
    errors = ", ".join(f"{k} {v}" for k, v in raw["errors"].items()) or "0"
    rate_label = f"{rate:.0f}/s" if rate else "max"
    late = raw.get("late_p99")
    result = Result(path, rate_label, raw["ok"], errors, raw["rps"], raw["p50"], raw["p90"], raw["p99"], cpu, elapsed)
    result.backlog = backlog.events()
    sent_late = "" if late is None else f"  sent late p99 {late:.2f} ms"
    warm = raw.get("warmup")
    warmed = ""
    if warm:
        warm_errors = ", ".join(f"{k} {v}" for k, v in warm["errors"].items()) or "0"
        warmed = f"  | warm-up: {warm['ok']} ok, p99 {warm['p99']:.2f} ms, errors {warm_errors}"
    print(
        f"  {path:<18} {rate_label:>7}: {result.rps:7.1f} req/s  p50 {result.p50:6.2f}  p90 {result.p90:6.2f}  "
        f"p99 {result.p99:7.2f} ms  errors {errors}  billing backlog {result.backlog}{sent_late}{warmed}",
        flush=True,
    )
    if hops is not None:
        print(hops.report(), flush=True)
    wait_for_billing(backlog)
    return result


def wait_for_billing(backlog: BillingBacklog, timeout_s: float = 120.0) -> None:
    """The next phase starts once billing has caught up, so no phase pays for
    the one before it."""
    deadline = time.monotonic() + timeout_s
    while backlog.events() and time.monotonic() < deadline:
        time.sleep(0.2)


def platform_cpu_ms(r: Result, names: list[str]) -> float:
    """The CPU the platform's processes used per request of a phase (ms)."""
    return sum(r.cpu_s.get(n, 0.0) for n in names) * 1e3 / max(1.0, r.rps * r.seconds)


def print_tables(results: list[Result], names: list[str]) -> None:
    print("\n| path | rate | req/s | p50 ms | p90 ms | p99 ms | errors | billing backlog at the end |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        row = f"| {r.path} | {r.rate} | {r.rps:.0f} | {r.p50:.2f} | {r.p90:.2f} | {r.p99:.2f} | {r.errors} |"
        print(f"{row} {r.backlog} |")
    # Each path against the direct call of its kind in its own round (phases
    # run in order).
    direct: dict[tuple[str, str], Result] = {}
    added_p99: dict[tuple[str, str], list[tuple[float, float]]] = {}
    print("\nAdded latency (path minus the direct call of its kind at the same rate, ms):")
    print("| path | rate | p50 | p90 | p99 |")
    print("|---|---|---|---|---|")
    for r in results:
        if r.path in BASELINES.values():
            direct[r.path, r.rate] = r
        base = direct.get((BASELINES.get(r.path, ""), r.rate))
        if base is not None and r.rate != "max":
            print(f"| {r.path} | {r.rate} | {r.p50 - base.p50:.2f} | {r.p90 - base.p90:.2f} | {r.p99 - base.p99:.2f} |")
            added_p99.setdefault((r.path, r.rate), []).append((r.p99 - base.p99, platform_cpu_ms(r, names)))
    if any(len(runs) > 1 for runs in added_p99.values()):
        # The machine's speed drifts: the platform's CPU per request in the
        # same round says how fast it was running then.
        print("\nAdded p99 of every round, sorted (ms; in parentheses the platform's CPU ms per request that round):")
        for (path, rate), runs in added_p99.items():
            print(f"  {path} {rate}: " + ", ".join(f"{x:.2f} ({cpu:.2f})" for x, cpu in sorted(runs)))
    print("\nCPU per request (ms), by process (total: the platform's, without the load generator):")
    print("| path | rate | " + " | ".join(names) + " | total | load generator |")
    print("|---|---|" + "---|" * (len(names) + 2))
    for r in results:
        done = max(1.0, r.rps * r.seconds)
        per = [r.cpu_s.get(n, 0.0) * 1e3 / done for n in names]
        load = r.cpu_s.get("load generator", 0.0) * 1e3 / done
        row = " | ".join(f"{x:.3f}" for x in per)
        print(f"| {r.path} | {r.rate} | {row} | {platform_cpu_ms(r, names):.3f} | {load:.3f} |")


PATHS = ("direct", "direct-stream", "edge-grpc", "edge-http", "edge-http-stream")
# What each path's added latency is measured against.
BASELINES = {"edge gRPC": "direct gRPC", "edge HTTP": "direct gRPC", "edge HTTP stream": "direct gRPC stream"}


def wait_for_stop_signal() -> None:
    """Until SIGINT or SIGTERM, then return, so the platform stops cleanly. Both
    handlers are set here: a program a shell started in the background inherits
    SIGINT ignored, and `bench.side_by_side` stops its sides with it."""
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0, help="per phase")
    parser.add_argument("--rates", default="100,300,1000", help="fixed rates in req/s")
    parser.add_argument(
        "--warmup",
        type=float,
        default=2.0,
        help="seconds of each phase's load before it is measured (whole seconds for wrk; 0: none)",
    )
    parser.add_argument(
        "--saturation", action=argparse.BooleanOptionalAction, default=True, help="also run at saturation (default)"
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="run the fixed-rate phases this many times (p99 varies run to run)"
    )
    parser.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated, of {', '.join(PATHS)}")
    parser.add_argument(
        "--moderation",
        choices=["in_process", "service"],
        default="in_process",
        help="where the router moderates chat (MARIANA_ROUTER_MODERATION): its own process, or the service",
    )
    parser.add_argument(
        "--profile",
        metavar="PROCESS",
        help="py-spy the named process (e.g. router) during each saturation phase; needs `make bench-tools`",
    )
    parser.add_argument(
        "--ext-authz",
        choices=["grpc", "http"],
        help="how the edge asks auth (default: the topology's edge.ext_authz_api)",
    )
    parser.add_argument(
        "--hops",
        action="store_true",
        help="split each edge phase's time by hop (edge, router, mesh, inference) from Envoy's access log",
    )
    parser.add_argument("--hold", action="store_true", help="keep the platform up after the run (for profiling)")
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",") if r] * max(1, args.repeat) + ([0.0] if args.saturation else [])
    paths = args.paths.split(",")
    if unknown := set(paths) - set(PATHS):
        parser.error(f"unknown paths {sorted(unknown)}; choose from {', '.join(PATHS)}")
    master = "sk-bench-" + secrets.token_urlsafe(12)
    with tempfile.TemporaryDirectory() as data:
        # The per-tenant backstop at the edge (500/s) is a policy, not what the
        # platform can do: one bench tenant would hit it before saturation.
        raw = yaml.safe_load(DEFAULT_TOPOLOGY.read_text())
        raw["edge"]["tenant_rate_limit"] = {"requests_per_second": 1_000_000, "burst": 1_000_000}
        if args.ext_authz:
            raw["edge"]["ext_authz_api"] = args.ext_authz
        topology = Path(data) / "topology.yaml"
        topology.write_text(yaml.safe_dump(raw))
        settings = LauncherSettings(
            data_dir=Path(data),
            topology_file=topology,
            edge_port=free_port(),
            any_ports=True,
            master_key=SecretStr(master),
            model_dir=MODEL_DIR,
            inference_backend="echo",
            service_settings={"router": {"MODERATION": args.moderation}},
        )
        print(
            f"starting the platform: echo backend, moderation {args.moderation}, ext_authz {args.ext_authz} ...",
            flush=True,
        )
        with Stack(settings) as stack:
            assert stack.plan is not None
            edge = f"127.0.0.1:{stack.plan.edge_port}"
            (inference_port,) = stack.plan.service_ports["inference"]
            pki = str(Path(data) / "pki")
            key = issue_key(edge, master)
            meter = CpuMeter.of(stack)
            backlog = BillingBacklog(stack.plan.redis_port)
            warm = args.warmup
            direct = f"127.0.0.1:{inference_port}"
            loads: dict[str, tuple[str, Callable[[float, Mark], dict]]] = {
                "direct": (
                    "direct gRPC",
                    lambda rate, mark: grpc_load(
                        direct, "direct-complete", rate, args.seconds, warm, mark, tls_dir=pki
                    ),
                ),
                "direct-stream": (
                    "direct gRPC stream",
                    lambda rate, mark: grpc_load(
                        direct, "direct-generate", rate, args.seconds, warm, mark, tls_dir=pki
                    ),
                ),
                "edge-grpc": (
                    "edge gRPC",
                    lambda rate, mark: grpc_load(edge, "edge-chat", rate, args.seconds, warm, mark, key=key),
                ),
                "edge-http": (
                    "edge HTTP",
                    lambda rate, mark: wrk_warmed(edge, key, rate, args.seconds, warm, mark, stream=False),
                ),
                "edge-http-stream": (
                    "edge HTTP stream",
                    lambda rate, mark: wrk_warmed(edge, key, rate, args.seconds, warm, mark, stream=True),
                ),
            }
            hop_log = HopLog(stack.logs / "envoy.log", stack.plan.admin_port) if args.hops else None
            results = []

            def profiled(rate: float) -> bool:
                return bool(args.profile) and rate == 0

            for rate in rates:
                print(f"rate {'max' if rate == 0 else f'{rate:.0f}/s'}:", flush=True)
                for path in paths:
                    label, load = loads[path]
                    profile = Profile(stack.process(args.profile).pid, args.seconds) if profiled(rate) else None
                    hops = hop_log if path.startswith("edge") else None
                    results.append(measure(meter, backlog, label, rate, lambda mark: load(rate, mark), hops))  # noqa: B023
                    if profile is not None:
                        print(profile.report(results[-1].ok), flush=True)
            print_tables(results, [p.name for p in stack.processes])
            if args.hold:
                print(f"holding: edge {edge}, key {key}; Ctrl-C or SIGTERM stops", flush=True)
                wait_for_stop_signal()


if __name__ == "__main__":
    main()
