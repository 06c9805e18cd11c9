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

import shutil
import sys
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


def copy_googleapis() -> None:
    source = Path(annotations_pb2.__file__).parent.parent
    for name in GOOGLEAPIS_FILES:
        target = THIRD_PARTY / "google" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / name, target)


def run_protoc(args: list[str]) -> None:
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    argv = ["protoc", f"-I{PROTOS}", f"-I{THIRD_PARTY}", f"-I{well_known}", *args]
    if protoc.main(argv) != 0:
        sys.exit(f"protoc failed: {' '.join(argv)}")


def main() -> None:
    sources = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    copy_googleapis()
    shutil.rmtree(GEN, ignore_errors=True)
    GEN.mkdir(parents=True)
    run_protoc([f"--python_out={GEN}", f"--pyi_out={GEN}", f"--grpc_python_out={GEN}", *sources])
    run_protoc([f"--descriptor_set_out={DESCRIPTOR_SET}", "--include_imports", *sources, *STATUS_PROTOS])
    print(f"generated {len(sources)} protos into {GEN.relative_to(ROOT)}/ and {DESCRIPTOR_SET.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
