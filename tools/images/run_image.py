"""Proves a service image: inspects it (skopeo), unpacks it (umoci), starts
it with runc on the host's loopback with a dev certificate mounted, and waits
until grpc.health.v1 answers SERVING over mTLS; then runs the image's own
health check inside the container, and stops it with SIGTERM.

    make images   # or: bazel build //services/moderation:image
    .venv/bin/python -m tools.images.run_image moderation
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from launcher.settings import LauncherSettings
from mariana_common.healthcheck import serving
from mariana_common.tls import channel_credentials
from mesh.pki import mint_mesh
from mesh.plan import free_port
from mesh.topology import load_topology

REPO = Path(__file__).resolve().parents[2]
IMAGE_USER = 10001
OPERATOR = "operator"
# The router counts prompt tokens with the model's tokenizer (`make model`).
MODEL = LauncherSettings().resolved_model_dir()
MODEL_MOUNT = f"/models/{MODEL.name}"


def run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def inspect(layout: Path, tag: str) -> None:
    raw = json.loads(run("skopeo", "inspect", f"oci:{layout}:{tag}"))
    blobs = layout / "blobs" / "sha256"
    manifest = json.loads((blobs / raw["Digest"].removeprefix("sha256:")).read_bytes())
    # The config blob itself: skopeo's view keeps only OCI's fields (no Healthcheck).
    config = json.loads((blobs / manifest["config"]["digest"].removeprefix("sha256:")).read_bytes())["config"]
    sizes = [(blobs / d.removeprefix("sha256:")).stat().st_size for d in raw["Layers"]]
    layers = ", ".join(f"{s / 1e6:.1f} MB" for s in sizes)
    print(f"[image] {layout}: {raw['Digest']}")
    print(f"[image] layers: {layers} (uncompressed), total {sum(sizes) / 1e6:.1f} MB")
    print(f"[image] user {config['User']}, entrypoint {' '.join(config['Entrypoint'])}")
    print(f"[image] health check: {' '.join(config['Healthcheck']['Test'][1:])}")
    print(f"[image] labels: {', '.join(sorted(config['Labels']))}")


def settings_env(program: str, port: int, pki: str, data: str, redis_port: int) -> list[str]:
    prefix = f"MARIANA_{program.upper()}_"
    trust = load_topology().trust_domain
    env = {
        "PORT": str(port),
        "TLS_CERT": f"{pki}/{program}.pem",
        "TLS_KEY": f"{pki}/{program}.key",
        "TLS_CA": f"{pki}/ca.pem",
        "TLS_PEERS": json.dumps([f"spiffe://{trust}/envoy", f"spiffe://{trust}/{OPERATOR}"]),
        "SHUTDOWN_GRACE_S": "5",
    }
    # What else a program needs to start on its own (no Redis, no mesh peers).
    env |= {
        "auth": {"DATABASE": f"{data}/keys.db", "PEPPER_FILE": f"{data}/pepper"},
        "billing": {"DATABASE": f"{data}/ledger.db"},
        "inference": {"BACKEND": "echo", "MODEL_DIR": f"{data}/no-model"},
        "router": {
            "TOKENIZER_DIR": MODEL_MOUNT,
            "MODERATION_TARGET": "127.0.0.1:9",
            "UPSTREAMS": json.dumps({"inference": "127.0.0.1:9"}),
            "SPOOL_FILE": f"{data}/usage-spool.jsonl",
        },
    }.get(program, {})
    return [f"{prefix}{k}={v}" for k, v in env.items()] + [f"MARIANA_REDIS_URL=redis://127.0.0.1:{redis_port}/0"]


def bundle_for(
    layout: Path, tag: str, bundle: Path, program: str, port: int, pki: Path, data: Path, redis_port: int
) -> None:
    run("umoci", "unpack", "--image", f"{layout}:{tag}", str(bundle))
    spec_path = bundle / "config.json"
    spec = json.loads(spec_path.read_text())
    # The host's loopback: no network namespace of its own.
    spec["linux"]["namespaces"] = [ns for ns in spec["linux"]["namespaces"] if ns["type"] != "network"]
    spec["process"]["terminal"] = False
    spec["process"]["env"] += settings_env(program, port, "/run/mariana/pki", "/var/lib/mariana", redis_port)
    spec["mounts"] += [
        {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=1777"]},
        {"destination": "/run/mariana/pki", "type": "bind", "source": str(pki), "options": ["bind", "ro"]},
        {"destination": "/var/lib/mariana", "type": "bind", "source": str(data), "options": ["bind", "rw"]},
        {"destination": MODEL_MOUNT, "type": "bind", "source": str(MODEL), "options": ["bind", "ro"]},
    ]
    spec["root"]["readonly"] = True
    spec_path.write_text(json.dumps(spec, indent=1))


def operator_serving(port: int, pki: Path) -> bool:
    credentials = channel_credentials(pki / f"{OPERATOR}.pem", pki / f"{OPERATOR}.key", pki / "ca.pem")
    return serving(f"127.0.0.1:{port}", credentials, timeout_s=1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("program", choices=["auth", "billing", "inference", "moderation", "router"])
    parser.add_argument("--layout", type=Path, default=None, help="default: bazel-bin/services/<program>/image")
    parser.add_argument("--tag", default="dev")
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args()
    layout = (args.layout or REPO / "bazel-bin" / "services" / args.program / "image").resolve()
    for tool in ("skopeo", "umoci", "runc"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed: `make images` installs it")
    inspect(layout, args.tag)
    container = f"mariana-{args.program}-{os.getpid()}"
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        pki, data = work / "pki", work / "data"
        mint_mesh(pki, load_topology().trust_domain, [args.program, OPERATOR, "envoy"])
        data.mkdir()
        for path in [pki, data, *pki.iterdir()]:
            os.chown(path, IMAGE_USER, IMAGE_USER)  # the image runs as a non-root user
        port, redis_port = free_port(), free_port()
        # The usage stream and rate limits live in Redis: a real one on the host's loopback.
        redis = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(redis_port), "--save", "", "--dir", str(work)],
            stdout=subprocess.DEVNULL,
        )
        started = time.monotonic()
        bundle_for(layout, args.tag, work / "bundle", args.program, port, pki, data, redis_port)
        unpacked = time.monotonic() - started
        log = (work / "container.log").open("wb")
        process = subprocess.Popen(["runc", "run", "-b", str(work / "bundle"), container], stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + args.timeout
            while not operator_serving(port, pki):
                if process.poll() is not None or time.monotonic() > deadline:
                    print((work / "container.log").read_text()[-3000:], file=sys.stderr)
                    print("[image] the container did not become SERVING", file=sys.stderr)
                    return 1
                time.sleep(0.2)
            up = time.monotonic() - started - unpacked
            print(f"[image] unpacked in {unpacked:.1f} s; SERVING over mTLS on 127.0.0.1:{port} {up:.1f} s after start")
            own = subprocess.run(
                ["runc", "exec", container, "/usr/bin/python3.11", "-m", "mariana_common.healthcheck", args.program],
                capture_output=True,
                timeout=30,
            )
            print(f"[image] the image's own health check inside the container: exit {own.returncode}")
            ps = run("runc", "ps", container).splitlines()[1:]
            users = sorted({line.split()[0] for line in ps})
            print(f"[image] processes in the container: {len(ps)}, run by {', '.join(users)} (non-root)")
            if own.returncode != 0:
                return 1
        finally:
            subprocess.run(["runc", "kill", container, "TERM"], capture_output=True)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                subprocess.run(["runc", "kill", container, "KILL"], capture_output=True)
                process.wait(5)
            subprocess.run(["runc", "delete", "-f", container], capture_output=True)
            log.close()
            redis.terminate()
            redis.wait(10)
        print(f"[image] stopped with SIGTERM (exit {process.returncode})")
        if process.returncode != 0:
            print((work / "container.log").read_text()[-2000:], file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
