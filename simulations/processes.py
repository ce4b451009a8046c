"""Processes we start for a local Flower deployment: free ports, start in a session of their own,
wait until they are ready, and stop them and everything they started, by pid.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

LOOPBACK = "127.0.0.1"


class ProcessFailed(RuntimeError):
    """A process we started (or a command we ran) failed or did not get ready; the message names it and its log."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


def start_process(command: list[str], env: dict[str, str], log_file: Path) -> subprocess.Popen:
    """``command`` with stdout and stderr to ``log_file``, leading a session (and process group) of its own,
    so that stopping it reaches the children it starts (:func:`stop_processes`)."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "w") as log:
        return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for_port(
    port: int, process: subprocess.Popen, log_file: Path, timeout: float = 60.0, what: str = "flower-superlink"
) -> None:
    """Wait until something listens on ``port`` on loopback; fail early if ``process`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ProcessFailed(f"{what} exited with code {process.returncode}; see {log_file}")
        with socket.socket() as probe:
            if probe.connect_ex((LOOPBACK, port)) == 0:
                return
        time.sleep(0.3)
    raise ProcessFailed(f"{what} did not listen on port {port} within {timeout:.0f} s; see {log_file}")


def wait_for_log_line(
    process: subprocess.Popen, log_file: Path, pattern: str, timeout: float, what: str
) -> re.Match:
    """Wait until ``pattern`` appears in ``log_file``; fail early if the process exits."""
    deadline = time.monotonic() + timeout
    while True:
        found = re.search(pattern, log_file.read_text(errors="replace")) if log_file.exists() else None
        if found:
            return found
        if process.poll() is not None:
            raise ProcessFailed(f"{what} exited with code {process.returncode}; see {log_file}")
        if time.monotonic() > deadline:
            raise ProcessFailed(f"{what}: no '{pattern}' in its log within {timeout:.0f} s; see {log_file}")
        time.sleep(0.3)


def stop_process_group(process: subprocess.Popen) -> None:
    """Stop a process we started with :func:`start_process` and its process group: SIGTERM, then
    SIGKILL after 20 s."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _stat(pid: int) -> list[str] | None:
    """Fields 3… of /proc/<pid>/stat (state, ppid, …), or None when the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def descendants_of(pids: set[int]) -> set[int]:
    """Every live descendant of ``pids`` (SuperExec starts app processes in sessions of their own)."""
    parents = {}
    for entry in Path("/proc").glob("[0-9]*"):
        fields = _stat(int(entry.name))
        if fields is not None and fields[0] != "Z":
            parents[int(entry.name)] = int(fields[1])
    found, frontier = set(), set(pids)
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _start_time(pid: int) -> str | None:
    fields = _stat(pid)
    return None if fields is None or fields[0] == "Z" else fields[19]  # starttime: tells a reused pid apart


def alive(pid: int, start_time: str | None = None) -> bool:
    """Whether ``pid`` runs (not a zombie), and is the process that started at ``start_time`` if given."""
    now = _start_time(pid)
    return now is not None and (start_time is None or now == start_time)


def stop_processes(processes: list[subprocess.Popen], timeout: float = 20.0) -> None:
    """Stop the processes we started and everything they started, by pid; nothing is left running.

    Each started process leads its own process group: all groups get SIGTERM at once (SuperNodes
    deactivate themselves on it), then stop_process_group waits for each and kills what hangs.
    flower-superexec is detached into a session of its own and exits when its parent dies (it
    polls every 0.2 s), its app processes likewise; the descendants found before stopping are
    waited for and, if still alive after ``timeout``, killed by pid (the same process: its start
    time is checked, so a reused pid is never hit).
    """
    descendants = {pid: _start_time(pid) for pid in descendants_of({process.pid for process in processes})}
    for process in processes:
        if process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    for process in processes:
        try:
            stop_process_group(process)
        except ProcessLookupError:  # the group ended between poll() and killpg()
            process.wait()
    deadline = time.monotonic() + timeout
    while (running := [pid for pid, started in descendants.items() if alive(pid, started)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in running:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
