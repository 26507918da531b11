"""Checks before launch: the port must be free; GPU memory already held is named."""

from __future__ import annotations

import errno
import os
import socket

from vllm_supervisor.errors import ExitCode, SupervisorError


def _listeners() -> list[tuple[int, str]]:
    """(port, socket inode) for every listening TCP socket, from /proc/net/tcp{,6}."""
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if parts[3] == "0A":  # TCP_LISTEN
                        out.append((int(parts[1].rsplit(":", 1)[1], 16), parts[9]))
        except OSError:
            continue
    return out


def _socket_inodes(pid: str | int) -> set[str]:
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                t = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if t.startswith("socket:["):
                inodes.add(t[8:-1])
    except OSError:
        pass
    return inodes


def port_holder(port: int) -> str | None:
    """Who listens on TCP PORT here ('pid N (cmd)'); None if nobody."""
    inodes = {inode for p, inode in _listeners() if p == port}
    if not inodes:
        return None
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if _socket_inodes(pid) & inodes:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as c:
                    cmd = c.read().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                cmd = "?"
            return f"pid {pid} ({cmd[:80]})"
    return "a process not visible here"


def listening_ports(pid: int) -> list[int]:
    """TCP ports PID listens on."""
    mine = _socket_inodes(pid)
    return sorted({p for p, inode in _listeners() if inode in mine})


def check_port(host: str, port: int) -> None:
    """Raise a 'failed to start' error when HOST:PORT cannot be bound."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    bind_host = "::" if family == socket.AF_INET6 else "0.0.0.0"
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind((bind_host, port))
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                return  # e.g. no IPv6 here: vLLM will say what is wrong
            who = port_holder(port) or "another process"
            raise SupervisorError(
                f"port {port} is already in use by {who}",
                "stop that process (a leftover vLLM tree?), or give vLLM another --port",
                ExitCode.START_FAILED) from None


def gpu_holders(readings, lookup, user_of) -> list[str]:
    """'GPU i: pid P (title, user) N MiB' for every process already on an in-scope GPU."""
    out = []
    for r in readings:
        for pid, mib in r.procs:
            info = lookup(pid)
            title = info.title[:60] if info else "not visible here"
            amount = "N/A" if mib is None else f"{mib:.0f} MiB"
            out.append(f"GPU {r.index}: pid {pid} ({title}, user {user_of(pid)}) {amount}")
    return out
