"""Checks before launch: the port must be free; GPU memory already held is named."""

from __future__ import annotations

import errno
import os
import socket

from vllm_supervisor.errors import ExitCode, SupervisorError


def port_holder(port: int) -> str | None:
    """Who listens on TCP PORT here ('pid N (cmd)'), from /proc/net/tcp{,6}; None if unknown."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    local, state, inode = parts[1], parts[3], parts[9]
                    if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                        inodes.add(inode)
        except OSError:
            continue
    if not inodes:
        return None
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    with open(f"/proc/{pid}/cmdline", "rb") as c:
                        cmd = c.read().replace(b"\0", b" ").decode(errors="replace").strip()
                    return f"pid {pid} ({cmd[:80]})"
        except OSError:
            continue
    return "a process not visible here"


def listening_ports(pid: int) -> list[int]:
    """TCP ports PID listens on."""
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
        return []
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if parts[3] == "0A" and parts[9] in inodes:
                        ports.add(int(parts[1].rsplit(":", 1)[1], 16))
        except OSError:
            continue
    return sorted(ports)


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


def gpu_holders(readings) -> list[str]:
    """'GPU i: pid P (title, user) N MiB' for every process already on an in-scope GPU."""
    from vllm_supervisor.gpu import _user
    from vllm_supervisor.proctree import read_proc

    out = []
    for r in readings:
        for pid, mib in r.procs:
            info = read_proc(pid)
            title = info.title[:60] if info else "not visible here"
            amount = "N/A" if mib is None else f"{mib:.0f} MiB"
            out.append(f"GPU {r.index}: pid {pid} ({title}, user {_user(pid)}) {amount}")
    return out
