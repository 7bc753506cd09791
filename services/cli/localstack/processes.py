"""The local stack's processes and who holds a port, found with psutil.

Every supervised process carries two environment markers, inherited by its children:
``MLOPS_LOCAL_STACK`` (the stack's var directory) and ``MLOPS_LOCAL_STACK_PROGRAM`` (its
program). They let ``down`` prove nothing was left behind and let a restarted program end the
remains of its previous run (services/cli/replace_previous.py). supervisord itself carries only
the first.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import psutil

from services.cli.localstack.settings import PROGRAM_MARKER, STACK_MARKER


@dataclass(frozen=True)
class StackProcess:
    pid: int
    program: str
    command: str


def stack_processes(var_dir: Path, program: str | None = None) -> list[StackProcess]:
    """Live processes carrying this stack's marker (and ``program``'s, if given)."""
    found = []
    for process in psutil.process_iter(["pid", "environ", "cmdline"], ad_value=None):
        environ = process.info["environ"]  # None: gone meanwhile, a zombie, or not ours to read
        if not environ or environ.get(STACK_MARKER) != str(var_dir):
            continue
        name = environ.get(PROGRAM_MARKER, "supervisord")
        if program is None or name == program:
            command = " ".join(process.info["cmdline"] or [])
            found.append(StackProcess(process.info["pid"], name, command))
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie has ended (its parent just has not reaped it yet)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def end_processes(processes: Iterable[StackProcess], timeout_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL what is still alive after ``timeout_s``."""
    pids = [p.pid for p in processes]
    for end in (psutil.Process.terminate, psutil.Process.kill):
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                end(psutil.Process(pid))
        deadline = time.monotonic() + timeout_s
        # polled, not psutil.wait_procs: these are not our children, and a zombie counts as ended
        while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        pids = [pid for pid in pids if alive(pid)]
        if not pids:
            return


def listener_of(port: int) -> str | None:
    """Which process listens on TCP ``port`` ("name (pid N)"), for error messages."""
    try:
        connections = psutil.net_connections(kind="tcp")
    except psutil.AccessDenied:
        return None
    for connection in connections:
        if (
            connection.status == psutil.CONN_LISTEN
            and connection.laddr
            and connection.laddr.port == port
        ):
            if connection.pid is None:
                return "a process of another user"
            try:
                return f"{psutil.Process(connection.pid).name()} (pid {connection.pid})"
            except psutil.Error:
                return f"pid {connection.pid}"
    return None
