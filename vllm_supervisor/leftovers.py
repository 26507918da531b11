"""Files a killed vLLM tree leaves behind, removed only when they belonged to that tree.

- vLLM puts its torch.distributed FileStore (`vllm_dist_<hex>`) and its ZMQ IPC sockets in
  tempfile.gettempdir(). The supervisor gives each tree a private TMPDIR, so everything
  there is the tree's by construction and the whole folder goes after the stop.
- multiprocessing's shared memory (`/dev/shm/psm_*`) and semaphores (`/dev/shm/sem.mp-*`)
  are named at random. They are attributed by reading the tree's own /proc/PID/maps and
  /proc/PID/fd while it lives; only those paths are ever unlinked.
"""

from __future__ import annotations

import getpass
import os
import shutil
import tempfile
from pathlib import Path

SHM = "/dev/shm/"


class Leftovers:
    """A private TMPDIR for the tree, and the /dev/shm files seen in its processes."""

    def __init__(self, private_tmp: bool):
        self.tmpdir: Path | None = None
        if private_tmp:
            base = tempfile.gettempdir()
            self.tmpdir = Path(tempfile.mkdtemp(prefix=f"vllm-supervise-{os.getpid()}-",
                                                dir=base))
            self._base = base
        self.shm: set[str] = set()

    def env(self, env: dict[str, str]) -> dict[str, str]:
        """ENV with TMPDIR pointing at the private folder; torch's compile cache stays where
        it would have been, so restarts keep it warm."""
        if self.tmpdir is None:
            return env
        out = dict(env, TMPDIR=str(self.tmpdir))
        if "TORCHINDUCTOR_CACHE_DIR" not in env:
            try:
                user = getpass.getuser()
            except (KeyError, OSError):
                user = str(os.getuid())
            out["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(self._base, f"torchinductor_{user}")
        return out

    def note(self, pids: list[int]) -> None:
        """Record the /dev/shm files these live processes map or hold open."""
        for pid in pids:
            self.shm.update(_shm_paths(pid))

    def remove(self) -> list[str]:
        """After the tree is gone: unlink its /dev/shm files that are still there and remove
        the private TMPDIR with what is left in it. Returns what was removed."""
        removed = []
        for path in sorted(self.shm):
            try:
                os.unlink(path)
                removed.append(path)
            except FileNotFoundError:
                pass
            except OSError:
                continue
        if self.tmpdir is not None and self.tmpdir.exists():
            removed += sorted(str(p) for p in self.tmpdir.rglob("*"))
            shutil.rmtree(self.tmpdir, ignore_errors=True)
        return removed


    def unattributed(self, since_wall: float) -> list[str]:
        """/dev/shm files named like multiprocessing's, made by this user since SINCE_WALL,
        that no tree process was seen using: possibly the tree's, so reported, never
        removed (another program of this user may own them)."""
        out = []
        try:
            names = os.listdir(SHM)
        except OSError:
            return out
        for name in names:
            if not name.startswith(("psm_", "sem.mp-")) or SHM + name in self.shm:
                continue
            try:
                st = os.stat(SHM + name)
            except OSError:
                continue
            if st.st_uid == os.getuid() and st.st_ctime >= since_wall - 1:
                out.append(SHM + name)
        return sorted(out)


def _shm_paths(pid: int) -> set[str]:
    found: set[str] = set()
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                i = line.find(SHM)
                if i >= 0:
                    found.add(line[i:].rstrip("\n").removesuffix(" (deleted)"))
    except OSError:
        pass
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith(SHM) and not target.endswith(" (deleted)"):
                found.add(target)
    except OSError:
        pass
    return {p for p in found if "/" not in p[len(SHM):]}
