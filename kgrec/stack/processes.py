"""Detached service processes: start with a pid file and a log, check, and stop a whole tree."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import httpx
import psutil


class StackError(RuntimeError):
    """A stack operation failed: a one-line message for the user, then (when a service failed to
    start) the end of its log."""


def start_detached(argv: Sequence[str], env: Mapping[str, str], pid_file: Path, log_file: Path,
                   cwd: Path | None = None) -> int:
    """Start ``argv`` in its own session (signals to the CLI's terminal never reach it; its pgid is
    its pid, so ``stop_tree`` can signal every child it spawns), output appended to ``log_file``."""
    with open(log_file, "ab") as log:
        log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} start: {' '.join(argv)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            list(argv), env=dict(env), cwd=cwd, stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
        )
    pid_file.write_text(f"{proc.pid}\n")
    return proc.pid


def read_pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return None


def _reap(pid: int) -> None:
    # A service started by this very process (library use, tests) would linger as a zombie.
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def alive(pid: int | None, marker: str | None = None) -> bool:
    """Whether ``pid`` runs (not a zombie) and, against pid reuse, its command line has ``marker``."""
    if pid is None:
        return False
    _reap(pid)
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return marker is None or marker in " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def process_tree(pid: int) -> list[psutil.Process]:
    """The process, its descendants (Prefect's flow runs start sessions of their own) and any
    process left in its session (orphans of a dead child)."""
    procs: dict[int, psutil.Process] = {}
    with contextlib.suppress(psutil.NoSuchProcess):
        leader = psutil.Process(pid)
        procs[pid] = leader
        for child in leader.children(recursive=True):
            procs[child.pid] = child
    for proc in psutil.process_iter():
        with contextlib.suppress(OSError, psutil.Error):
            if proc.pid not in procs and os.getsid(proc.pid) == pid:
                procs[proc.pid] = proc
                for child in proc.children(recursive=True):
                    procs[child.pid] = child
    return list(procs.values())


def stop_tree(pid: int, timeout: float) -> list[int]:
    """SIGTERM the process group and every process of the tree, SIGKILL what is left after
    ``timeout`` seconds; returns the pids that were signalled."""
    procs = process_tree(pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    survivors = _wait_gone(procs, timeout)
    for proc in survivors:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    _wait_gone(survivors, 5)
    return [p.pid for p in procs]


def _running(proc: psutil.Process) -> bool:
    _reap(proc.pid)
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait until every process has exited; a zombie counts as gone (psutil.wait_procs would wait
    for a parent that is not us to reap it). Returns those still running after ``timeout``."""
    deadline = time.monotonic() + timeout
    while (left := [p for p in procs if _running(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        # the servers set SO_REUSEADDR too, so a port in TIME_WAIT counts as free
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def pick_port(host: str, preferred: int, taken: set[int], tries: int = 50) -> int:
    """``preferred`` when free, else the next free one above it (else any free port)."""
    for port in range(preferred, preferred + tries):
        if port not in taken and port_free(host, port):
            return port
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def log_tail(log_file: Path, lines: int = 15) -> str:
    try:
        text = log_file.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return "(no log)"
    return "\n".join(text[-lines:])


def wait_until(check: Callable[[], bool], what: str, timeout: float, pid: int | None = None,
               log_file: Path | None = None, interval: float = 0.5) -> None:
    """Poll ``check`` until it is true; fail early when the process ``pid`` died."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 - not up yet (connection refused, 503, ...)
            pass
        if pid is not None and not alive(pid):
            raise StackError(f"{what} exited while starting; end of {log_file}:\n{log_tail(log_file)}")
        if time.monotonic() > deadline:
            if pid is not None:  # else the next `up` would take the half-started process as running
                stop_tree(pid, 10)
            raise StackError(f"{what} not ready after {timeout:.0f} s; end of {log_file}:\n{log_tail(log_file)}")
        time.sleep(interval)


def http_ok(url: str) -> bool:
    return httpx.get(url, timeout=3).status_code == 200
