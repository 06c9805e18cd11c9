"""What the protos say about each method that the mesh needs: which gRPC
paths a package serves, which of them are safe to repeat (the standard
`option idempotency_level` on the rpc: NO_SIDE_EFFECTS or IDEMPOTENT), and
which answer with a stream."""

from __future__ import annotations

from collections.abc import Iterator
from functools import cache
from pathlib import Path

from google.protobuf import descriptor_pb2

_REPEATABLE = {
    descriptor_pb2.MethodOptions.NO_SIDE_EFFECTS,
    descriptor_pb2.MethodOptions.IDEMPOTENT,
}


@cache
def _files(descriptor_set: Path) -> tuple[descriptor_pb2.FileDescriptorProto, ...]:
    return tuple(descriptor_pb2.FileDescriptorSet.FromString(descriptor_set.read_bytes()).file)


def _methods(descriptor_set: Path, package: str) -> Iterator[tuple[str, descriptor_pb2.MethodDescriptorProto]]:
    """`/pkg.Service/Method` and its descriptor, for every method of every service in `package`."""
    for file in _files(descriptor_set):
        if file.package == package:
            for service in file.service:
                for method in service.method:
                    yield f"/{package}.{service.name}/{method.name}", method


def method_paths(descriptor_set: Path, package: str) -> dict[str, bool]:
    """`/pkg.Service/Method` -> whether the method may be repeated, for every
    method of every service in `package`."""
    paths = {
        path: method.options.idempotency_level in _REPEATABLE for path, method in _methods(descriptor_set, package)
    }
    if not paths:
        raise ValueError(f"no gRPC service in package {package!r} in {descriptor_set}")
    return paths


def streaming_paths(descriptor_set: Path, package: str) -> list[str]:
    """The server-streaming methods of `package`."""
    return sorted(path for path, method in _methods(descriptor_set, package) if method.server_streaming)


def idempotent_paths(descriptor_set: Path, package: str) -> list[str]:
    return sorted(path for path, repeatable in method_paths(descriptor_set, package).items() if repeatable)
