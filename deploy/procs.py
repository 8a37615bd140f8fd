"""Background processes with pid files and logs under the state folder, and waiting until one answers."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from kota.process import alive
from kota.settings import StackSettings

Say = Callable[[str], None]


class StackError(RuntimeError):
    """Something the person running the stack must fix; the message says what."""


def pid_file(stack: StackSettings, name: str) -> Path:
    return stack.run_dir / f"{name}.pid"


def log_file(stack: StackSettings, name: str) -> Path:
    return stack.logs_dir / f"{name}.log"


def running_pid(stack: StackSettings, name: str) -> int | None:
    path = pid_file(stack, name)
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if alive(pid) else None


def spawn(
    stack: StackSettings,
    name: str,
    argv: list[str],
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    user: str | None = None,
) -> int:
    """Start `argv` in its own session, output appended to logs/<name>.log; return its pid."""
    stack.logs_dir.mkdir(parents=True, exist_ok=True)
    stack.run_dir.mkdir(parents=True, exist_ok=True)
    with open(log_file(stack, name), "ab") as log:
        proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            cwd=cwd,
            start_new_session=True,
            user=user,
        )
    pid_file(stack, name).write_text(f"{proc.pid}\n")
    return proc.pid


def stop(stack: StackSettings, name: str, *, timeout_s: float = 20.0, hard: bool = False) -> bool:
    """SIGTERM (or SIGKILL when `hard`), wait, then SIGKILL. Return whether it was running."""
    pid = running_pid(stack, name)
    if pid is None:
        pid_file(stack, name).unlink(missing_ok=True)
        return False
    _signal_group(pid, signal.SIGKILL if hard else signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while alive(pid) and time.monotonic() < deadline:
        _reap(pid)
        time.sleep(0.1)
    if alive(pid):
        _signal_group(pid, signal.SIGKILL)
        while alive(pid):
            _reap(pid)
            time.sleep(0.05)
    _reap(pid)
    pid_file(stack, name).unlink(missing_ok=True)
    return True


def _signal_group(pid: int, signum: int) -> None:
    """Signal the process and what it started (spawn makes each a session leader): a kill -9 of
    `kota api` must not leave its worker processes holding the port."""
    try:
        os.killpg(pid, signum)
    except (ProcessLookupError, PermissionError):
        os.kill(pid, signum)


def _stats() -> Iterator[tuple[int, list[str]]]:
    """Every process's pid and its /proc/PID/stat fields after the command name (state, ppid, pgrp, …)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            yield int(stat.parent.name), stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue


def group_pids(pid: int) -> list[int]:
    """The processes of `pid`'s process group (itself and the workers it started)."""
    return [member for member, fields in _stats() if int(fields[2]) == pid]


def children(pid: int) -> list[int]:
    """The processes `pid` started itself."""
    return [child for child, fields in _stats() if int(fields[1]) == pid]


def _reap(pid: int) -> None:
    # Processes we started ourselves become zombies until reaped.
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def wait_until(check: Callable[[], bool], what: str, stack: StackSettings, *, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.3)
    raise StackError(f"{what} did not answer within {timeout_s:.0f} s; see {log_file(stack, what)}")
