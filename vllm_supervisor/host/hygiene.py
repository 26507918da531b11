"""Environment hygiene: the inherited torch.distributed / torchrun variables that make a
vLLM started from inside another job join that job's process group and hang (vllm#7939).

torch.distributed's env:// rendezvous reads MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE;
torchrun (torch.distributed.run / elastic) sets those plus LOCAL_RANK, LOCAL_WORLD_SIZE,
GROUP_RANK, GROUP_WORLD_SIZE, ROLE_RANK, ROLE_NAME, ROLE_WORLD_SIZE and TORCHELASTIC_*
(RUN_ID, RESTART_COUNT, MAX_RESTARTS, USE_AGENT_STORE, ERROR_FILE, ...), and reads its own
options from PET_* variables. TORCH_NCCL_* and NCCL_* tune communication, they do not
make a process join a group: they are kept.
"""

from __future__ import annotations

DIST_VARS = (
    "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
    "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE",
    "NODE_RANK", "TORCH_DIST_INIT_BARRIER",
)
DIST_PREFIXES = ("TORCHELASTIC_", "PET_")


def is_dist_var(name: str) -> bool:
    """True for a variable that makes a process join (or configure) a foreign group."""
    return name in DIST_VARS or name.startswith(DIST_PREFIXES)


def scrub(env: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """ENV without the distributed variables, and the sorted names removed."""
    removed = sorted(k for k in env if is_dist_var(k))
    return {k: v for k, v in env.items() if k not in removed}, removed


def suspicious(env: dict[str, str]) -> list[str]:
    """NAME=VALUE for each distributed variable still present (for a hang diagnosis)."""
    return [f"{k}={env[k]}" for k in sorted(env) if is_dist_var(k)]
