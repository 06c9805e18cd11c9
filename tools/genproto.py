"""Generate Python code and Envoy's descriptor set from protos/.

Outputs (never committed):
  gen/                      Python modules (*_pb2.py, *_pb2.pyi, *_pb2_grpc.py)
  build/mariana.pb          descriptor set with imports, for Envoy's transcoder
  build/third_party/google/api/{annotations,http}.proto
  build/third_party/google/rpc/{status,error_details}.proto
                            copied from the googleapis-common-protos wheel (the
                            rpc ones are in the descriptor set so the transcoder
                            can render a status's ErrorInfo details as JSON)
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import grpc_tools
from google.api import annotations_pb2
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
GEN = ROOT / "gen"
BUILD = ROOT / "build"
THIRD_PARTY = BUILD / "third_party"
DESCRIPTOR_SET = BUILD / "mariana.pb"
GOOGLEAPIS_FILES = ("api/annotations.proto", "api/http.proto", "rpc/status.proto", "rpc/error_details.proto")
STATUS_PROTOS = ("google/rpc/status.proto", "google/rpc/error_details.proto")


def copy_googleapis(third_party: Path) -> None:
    source = Path(annotations_pb2.__file__).parent.parent
    for name in GOOGLEAPIS_FILES:
        target = third_party / "google" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / name, target)


def run_protoc(protos: Path, third_party: Path, args: list[str]) -> None:
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    argv = ["protoc", f"-I{protos}", f"-I{third_party}", f"-I{well_known}", *args]
    if protoc.main(argv) != 0:
        sys.exit(f"protoc failed: {' '.join(argv)}")


def generate(protos: Path, python_out: Path, descriptor_set: Path, third_party: Path) -> int:
    sources = sorted(str(p.relative_to(protos)) for p in protos.rglob("*.proto"))
    copy_googleapis(third_party)
    shutil.rmtree(python_out, ignore_errors=True)
    python_out.mkdir(parents=True)
    descriptor_set.parent.mkdir(parents=True, exist_ok=True)
    run_protoc(
        protos,
        third_party,
        [f"--python_out={python_out}", f"--pyi_out={python_out}", f"--grpc_python_out={python_out}", *sources],
    )
    run_protoc(
        protos, third_party, [f"--descriptor_set_out={descriptor_set}", "--include_imports", *sources, *STATUS_PROTOS]
    )
    return len(sources)


def main() -> None:
    """`make protos` runs it with no arguments; Bazel's genrule names the outputs."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protos", type=Path, default=PROTOS)
    parser.add_argument("--python-out", type=Path, default=GEN)
    parser.add_argument("--descriptor-out", type=Path, default=DESCRIPTOR_SET)
    args = parser.parse_args()
    if args.python_out == GEN:
        count = generate(args.protos, GEN, args.descriptor_out, THIRD_PARTY)
    else:
        with tempfile.TemporaryDirectory() as third_party:
            count = generate(args.protos, args.python_out, args.descriptor_out, Path(third_party))
    print(f"generated {count} protos into {args.python_out} and {args.descriptor_out}")


if __name__ == "__main__":
    main()
