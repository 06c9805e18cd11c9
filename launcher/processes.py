"""Child processes the launcher owns: started with a death signal so none
outlives the launcher, stopped with SIGTERM then SIGKILL after a grace."""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

_PR_SET_PDEATHSIG = 1
# util-linux's setpriv sets the death signal and execs the program: no Python
# runs in the child between fork and exec, which is not safe when the parent
# has other threads (gRPC's, in a benchmark that restarts a service under load:
# a child crashed there).
_SETPRIV = shutil.which("setpriv")


def _die_with_parent() -> None:
    # Runs in the child before exec: if the launcher dies (even by SIGKILL),
    # the kernel sends this child SIGTERM.
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def dying_with_parent(argv: list[str]) -> tuple[list[str], Callable[[], None] | None]:
    """`argv` started so that it gets SIGTERM when the launcher dies."""
    if _SETPRIV is not None:
        return [_SETPRIV, "--pdeathsig", "TERM", "--", *argv], None
    return argv, _die_with_parent


class ManagedProcess:
    def __init__(
        self, name: str, argv: list[str], env: dict[str, str], log_path: Path, cwd: Path, niceness: int = 0
    ) -> None:
        self.name = name
        self.niceness = niceness
        self.argv = argv
        self.env = env
        self.log_path = log_path
        self.cwd = cwd
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        argv, before_exec = dying_with_parent(self.argv)
        self.popen = subprocess.Popen(
            argv,
            env=self.env,
            cwd=self.cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=before_exec,
        )
        log.close()
        if self.niceness:  # before it has loaded anything: the whole process, its threads to come included
            os.setpriority(os.PRIO_PROCESS, self.popen.pid, self.niceness)

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def exited(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def signal(self, signum: int) -> None:
        if self.popen is not None and self.popen.poll() is None:
            os.kill(self.popen.pid, signum)

    def stop(self, grace_s: float) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.terminate()
        try:
            self.popen.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""
