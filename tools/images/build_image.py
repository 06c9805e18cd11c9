"""Builds a service's OCI image (an image layout directory) from:

- Debian packages (.deb files): the base layer, extracted with dpkg-deb —
  Debian's python3.11 and the shared libraries it and the wheels need;
- the service's files (its py_binary's runfiles: code, generated protos, data)
  and its pinned Python dependencies (the distributions it names and what they
  require, copied from the project's venv by their RECORD): the app layer.

Layers are uncompressed, reproducible tars (sorted, owned by root, mtime 0),
so the same inputs give the same digest. Bazel runs it (tools/images/image.bzl).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

APP = "/app"
SITE_PACKAGES = "/opt/mariana/site-packages"
PYTHON = "/usr/bin/python3.11"
USER = "10001:10001"
LAYER = "application/vnd.oci.image.layer.v1.tar"
CONFIG = "application/vnd.oci.image.config.v1+json"
SECOND = 1_000_000_000  # Docker's health-check durations are in nanoseconds


# The image's interpreter (python3.11-minimal from Debian bookworm), whose
# version decides requirement markers, not the venv's.
IMAGE_PYTHON = {"python_version": "3.11", "python_full_version": "3.11.2", "extra": ""}


def closure(names: list[str]) -> list[metadata.Distribution]:
    """The distributions `names` need on the image's Python, with what each
    requires (extras off)."""
    found: dict[str, metadata.Distribution] = {}
    todo = [canonicalize_name(n) for n in names]
    while todo:
        name = todo.pop()
        if name in found:
            continue
        dist = metadata.distribution(name)
        found[name] = dist
        for text in dist.requires or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate(IMAGE_PYTHON):
                todo.append(canonicalize_name(requirement.name))
    return sorted(found.values(), key=lambda d: canonicalize_name(d.metadata["Name"]))


def _reset(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    info.mtime = 0
    return info


class Layer:
    """A reproducible tar: entries added in any order, written sorted."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[Path | None, bytes | None, int | None]] = {}

    def add_tree(self, root: Path, prefix: str = "") -> None:
        for path in sorted(root.rglob("*")):
            self.entries[prefix + "/" + str(path.relative_to(root))] = (path, None, None)

    def add_file(self, name: str, source: Path) -> None:
        self.entries[name] = (source, None, None)

    def add_bytes(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self.entries[name] = (None, data, mode)

    def add_dir(self, name: str, mode: int) -> None:
        self.entries[name] = (None, None, mode)

    def write(self, path: Path) -> str:
        parents: set[str] = set()
        for name in self.entries:
            parts = name.strip("/").split("/")[:-1]
            parents.update("/" + "/".join(parts[: i + 1]) for i in range(len(parts)))
        with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
            for name in sorted(parents | set(self.entries)):
                source, data, mode = self.entries.get(name, (None, None, 0o755))
                arcname = name.lstrip("/")
                if source is not None:
                    tar.add(source, arcname, recursive=False, filter=_reset)
                elif data is not None:
                    info = _reset(tarfile.TarInfo(arcname))
                    info.size, info.mode = len(data), mode or 0o644
                    tar.addfile(info, io.BytesIO(data))
                else:
                    info = _reset(tarfile.TarInfo(arcname))
                    info.type, info.mode = tarfile.DIRTYPE, mode or 0o755
                    tar.addfile(info)
        return sha256_file(path)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def base_layer(debs: list[Path], work: Path) -> Layer:
    rootfs = work / "rootfs"
    rootfs.mkdir()
    for deb in sorted(debs):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(rootfs)], check=True)
    for doc in ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/lintian"):
        subprocess.run(["rm", "-rf", str(rootfs / doc)], check=True)
    layer = Layer()
    layer.add_tree(rootfs)
    layer.add_dir("/tmp", 0o1777)
    layer.add_bytes("/etc/passwd", b"root:x:0:0:root:/root:/sbin/nologin\nmariana:x:10001:10001::/app:/sbin/nologin\n")
    layer.add_bytes("/etc/group", b"root:x:0:\nmariana:x:10001:\n")
    return layer


def app_layer(runfiles: list[tuple[str, Path]], packages: list[str]) -> tuple[Layer, list[str]]:
    layer = Layer()
    for short_path, source in runfiles:
        if short_path.startswith("../"):  # other repositories: the toolchain's, not the app's
            continue
        layer.add_file(f"{APP}/{short_path}", source)
    dists = closure(packages)
    for dist in dists:
        for file in dist.files or []:
            source = Path(str(dist.locate_file(file)))
            relative = str(file)
            if relative.startswith("..") or not source.is_file() or "__pycache__" in relative:
                continue
            # RECORD hashes the venv's own scripts (their shebangs name the venv's
            # path): without it the layer is the same from any checkout.
            if relative.endswith((".dist-info/RECORD", ".dist-info/direct_url.json")):
                continue
            layer.add_file(f"{SITE_PACKAGES}/{relative}", source)
    return layer, [f"{d.metadata['Name']}=={d.version}" for d in dists]


def write_blob(layout: Path, data: bytes) -> tuple[str, int]:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return digest, len(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--program", required=True)
    parser.add_argument("--version", required=True)
    parser.add_argument("--debs", type=Path, required=True, help="file listing .deb paths, one a line")
    parser.add_argument("--runfiles", type=Path, required=True, help="file of 'short_path<TAB>path' lines")
    parser.add_argument("--package", action="append", default=[], help="a Python distribution the service needs")
    parser.add_argument("--out", type=Path, required=True, help="OCI image layout directory to create")
    parser.add_argument("--digest-out", type=Path, required=True)
    args = parser.parse_args()

    layout = args.out
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        debs = [Path(line) for line in args.debs.read_text().split() if line]
        runfiles = [
            (short, Path(path)) for short, path in (line.split("\t") for line in args.runfiles.read_text().splitlines())
        ]
        app, pinned = app_layer(runfiles, args.package)
        layers = []
        for name, layer in (("base", base_layer(debs, work)), ("app", app)):
            tar = work / f"{name}.tar"
            digest = layer.write(tar)
            os.replace(tar, layout / "blobs" / "sha256" / digest)
            layers.append(
                {
                    "mediaType": LAYER,
                    "digest": f"sha256:{digest}",
                    "size": (layout / "blobs" / "sha256" / digest).stat().st_size,
                }
            )

    prefix = f"MARIANA_{args.program.upper()}_"
    health = [PYTHON, "-m", "mariana_common.healthcheck", args.program]
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "User": USER,
            "Entrypoint": [PYTHON, "-m", f"services.{args.program}"],
            "WorkingDir": APP,
            "Env": [
                "PATH=/usr/bin:/bin",
                f"PYTHONPATH={APP}:{APP}/gen:{SITE_PACKAGES}",
                "PYTHONDONTWRITEBYTECODE=1",
                "PYTHONUNBUFFERED=1",
                f"{prefix}HOST=0.0.0.0",
            ],
            "Labels": {
                "org.opencontainers.image.title": f"mariana-{args.program}",
                "org.opencontainers.image.description": f"Mariana's {args.program} service",
                "org.opencontainers.image.version": args.version,
                "org.opencontainers.image.base.name": "debian:bookworm (python3.11 from Debian packages)",
                "dev.mariana.program": args.program,
                "dev.mariana.python-packages": " ".join(pinned),
            },
            # Docker's health check (OCI has none; podman and Docker read it).
            "Healthcheck": {
                "Test": ["CMD", *health],
                "Interval": 10_000_000_000,
                "Timeout": 3_000_000_000,
                "Retries": 3,
            },
        },
        "rootfs": {"type": "layers", "diff_ids": [layer["digest"] for layer in layers]},
        "history": [
            {"created_by": "dpkg-deb -x of Debian packages (tools/images/build_image.py)"},
            {"created_by": f"services.{args.program}, its runfiles and pinned Python packages"},
        ],
    }
    config_digest, config_size = write_blob(layout, json.dumps(config, sort_keys=True).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": f"sha256:{config_digest}",
            "size": config_size,
        },
        "layers": layers,
        "annotations": {"org.opencontainers.image.title": f"mariana-{args.program}"},
    }
    manifest_digest, manifest_size = write_blob(layout, json.dumps(manifest, sort_keys=True).encode())
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": f"sha256:{manifest_digest}",
                "size": manifest_size,
                "annotations": {"org.opencontainers.image.ref.name": args.version},
            }
        ],
    }
    (layout / "index.json").write_text(json.dumps(index, sort_keys=True))
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    args.digest_out.write_text(f"sha256:{manifest_digest}\n")
    print(f"mariana-{args.program}@sha256:{manifest_digest}", file=sys.stderr)


if __name__ == "__main__":
    main()
