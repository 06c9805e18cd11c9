"""Runs one test module with pytest inside Bazel's runfiles, with the
project's conftest.py and pyproject.toml. The venv's development path file
(which points at the source tree) is taken off sys.path, so a test sees only
what its BUILD file declares."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest


def main() -> int:
    workspace = Path(os.environ["TEST_SRCDIR"]) / os.environ["TEST_WORKSPACE"]
    source_tree = Path(sys.prefix).parent  # the venv lives in the source tree
    sys.path[:] = [p for p in sys.path if Path(p) not in (source_tree, source_tree / "gen")]
    os.chdir(workspace)
    args = ["-p", "no:cacheprovider", "-c", "pyproject.toml", "--rootdir", ".", "-q", *sys.argv[1:]]
    return int(pytest.main(args))


if __name__ == "__main__":
    sys.exit(main())
