"""The ownership rule: when a process is ours to signal. Records, command lines and names
are untrusted; what counts as proof is what no file edit can fake.

- Every vLLM tree we launch carries an instance token in its environment
  (VLLM_SUPERVISE_INSTANCE=<supervisor pid>:<supervisor start ticks>:<random>). Children
  inherit it; the kernel shows it in /proc/PID/environ to the same user and to root only.
- The supervisor itself carries no token: it proves it is alive by holding the flock of
  its instance lock file, which the kernel lists in /proc/locks under its PID.
- Whatever the proof, a process is never ours when it is PID 1, the caller or one of the
  caller's ancestors, or another user's (unless root asked for all users).
"""

from __future__ import annotations

import os
import secrets

from vllm_supervisor.host.procinfo import ProcId, ProcInfo
from vllm_supervisor.host.proctree import read_proc

TOKEN_VAR = "VLLM_SUPERVISE_INSTANCE"
UNREADABLE = "unreadable"  # /proc/PID/environ of another user: no proof either way


def new_token(supervisor: ProcId) -> str:
    """A fresh instance token naming its supervisor (so a token shows whether the tree's
    supervisor still lives) and 128 random bits (so it cannot be guessed)."""
    return f"{supervisor.pid}:{supervisor.start_ticks}:{secrets.token_hex(16)}"


def token_supervisor(token: str) -> ProcId | None:
    """The supervisor a token names, or None for a malformed one."""
    parts = token.split(":")
    if len(parts) != 3 or not (parts[0].isdigit() and parts[1].isdigit()):
        return None
    return ProcId(int(parts[0]), int(parts[1]))


def environ_token(pid: int) -> str | None:
    """PID's instance token; None without one; UNREADABLE when the kernel will not say."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            raw = f.read()
    except PermissionError:
        return UNREADABLE
    except OSError:
        return None
    key = TOKEN_VAR.encode() + b"="
    for entry in raw.split(b"\0"):
        if entry.startswith(key):
            return entry[len(key):].decode(errors="replace")
    return None


def carries_token(pid: int, owner: ProcId) -> bool:
    """Whether PID's environment carries a token naming the supervisor OWNER."""
    token = environ_token(pid)
    return token not in (None, UNREADABLE) and token_supervisor(token) == owner


def protected_pids() -> frozenset[int]:
    """PID 1, the caller and every ancestor of the caller: never signalled."""
    out, pid = {1, os.getpid()}, os.getppid()
    while pid > 1 and pid not in out:
        out.add(pid)
        info = read_proc(pid, cmdline=False)
        pid = info.ppid if info is not None else 0
    return frozenset(out)


def uid_of(pid: int) -> int | None:
    """The real uid owning PID, or None when it is gone."""
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def refusal(info: ProcInfo, protected: frozenset[int], all_users: bool = False) -> str | None:
    """Why INFO must never be signalled by us whatever a record says, or None."""
    if info.pid in protected:
        return "PID 1, the caller or one of its ancestors"
    uid = uid_of(info.pid)
    if uid is None:
        return "gone"
    if uid != os.geteuid() and not (all_users and os.geteuid() == 0):
        return f"owned by uid {uid}, not by us" + ("" if os.geteuid() else
                                                    " (pass --all-users to include it)")
    return None


def lock_holders(path: str) -> set[int]:
    """PIDs the kernel lists in /proc/locks as holding a lock on the file at PATH."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return set()
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    out = set()
    try:
        with open("/proc/locks") as f:
            for line in f:
                parts = line.split()
                # "1: FLOCK  ADVISORY  WRITE 123 fe:00:456 0 EOF" (a "->" marks a waiter)
                if (len(parts) >= 6 and parts[1] != "->" and parts[5] == dev
                        and parts[4].isdigit()):
                    out.add(int(parts[4]))
    except OSError:
        pass
    return out


def argv_of(pid: int) -> list[str]:
    """PID's argument vector as the kernel keeps it (empty when gone or a kernel thread)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.rstrip(b"\0").split(b"\0")] if raw else []


VLLM_MODULES = ("vllm.entrypoints.cli.main", "vllm.entrypoints.openai.api_server")
SCRIPT_MARK = b"vllm.entrypoints"  # what pip writes into vLLM's `vllm` console script


def is_vllm_server(pid: int) -> bool:
    """True when PID runs vLLM's real server entry point: `python -m vllm.entrypoints...`,
    or vLLM's console script with `serve` (a script is run by its interpreter, so the
    kernel shows `python /path/to/vllm serve ...`; the script file must be vLLM's own).
    Words in the arguments prove nothing: `echo vllm serve` is not vLLM."""
    argv = argv_of(pid)
    for i, a in enumerate(argv[:-1]):
        if a == "-m" and argv[i + 1] in VLLM_MODULES:
            return i + 1 < len(argv) and (argv[i + 1].endswith("api_server")
                                          or "serve" in argv[i + 2:i + 3])
    for i in (0, 1):  # the script itself, or the script after its interpreter
        if len(argv) > i + 1 and os.path.basename(argv[i]) == "vllm" and argv[i + 1] == "serve":
            return _is_vllm_script(pid, argv[i])
    return False


def _is_vllm_script(pid: int, path: str) -> bool:
    """Whether PATH (as PID saw it: relative to its cwd) is vLLM's console script."""
    full = path if os.path.isabs(path) else os.path.join(f"/proc/{pid}/cwd", path)
    try:
        with open(full, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return SCRIPT_MARK in head


def carries_title(info: ProcInfo) -> bool:
    """A VLLM::* process title (ps may show it cut to 15 characters)."""
    return info.name.startswith("VLLM::") or info.cmdline.startswith("VLLM::")
