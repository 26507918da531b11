"""Files a killed vLLM tree leaves behind, removed only when they belonged to that tree.

- vLLM puts its torch.distributed FileStore (`vllm_dist_<hex>`) and its ZMQ IPC sockets in
  tempfile.gettempdir(). The supervisor gives each tree a private TMPDIR, so everything
  there is the tree's by construction and the whole folder goes after the stop.
- multiprocessing's shared memory (`/dev/shm/psm_*`) and semaphores (`/dev/shm/sem.mp-*`)
  are named at random. They are attributed by reading the tree's own /proc/PID/maps and
  /proc/PID/fd while it lives: by path, and by inode, because glibc's sem_open maps a
  temporary `sem.XXXXXX` file and then hard-links it to the `sem.mp-*` name, so a
  semaphore's mapping never shows its final name. Only those files are ever unlinked.
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
        self.inodes: set[int] = set()

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
            paths, inodes = _shm_paths(pid)
            self.shm.update(paths)
            self.inodes.update(inodes)
        self.shm.update(self._by_inode())

    def _by_inode(self) -> set[str]:
        """Names in /dev/shm that are links to an inode the tree mapped or held open."""
        found = set()
        try:
            entries = list(os.scandir(SHM))
        except OSError:
            return found
        for e in entries:
            try:
                if e.is_file(follow_symlinks=False) and e.inode() in self.inodes:
                    found.add(e.path)
            except OSError:
                continue
        return found

    def remove(self) -> list[str]:
        """After the tree is gone: unlink its /dev/shm files that are still there and remove
        the private TMPDIR with what is left in it. Returns what was removed."""
        removed = []
        # Only names recorded while the tree lived: once its processes are gone, their
        # inodes are free and tmpfs may give them to someone else's files.
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
            if st.st_uid == os.getuid() and st.st_ctime >= since_wall:
                out.append(SHM + name)
        return sorted(out)


def _shm_paths(pid: int) -> tuple[set[str], set[int]]:
    """The /dev/shm paths PID maps or holds open, and their inode numbers."""
    found: set[str] = set()
    inodes: set[int] = set()
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                i = line.find(SHM)
                if i >= 0:
                    found.add(line[i:].rstrip("\n").removesuffix(" (deleted)"))
                    inodes.add(int(line.split()[4]))
    except (OSError, ValueError, IndexError):
        pass
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith(SHM):
                    inodes.add(os.stat(f"/proc/{pid}/fd/{fd}").st_ino)
                    if not target.endswith(" (deleted)"):
                        found.add(target)
            except OSError:
                continue
    except OSError:
        pass
    return {p for p in found if "/" not in p[len(SHM):] and os.path.exists(p)}, inodes
