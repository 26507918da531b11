"""The simulated vLLM's settings: its command line (`serve MODEL --port N -tp N ...`) and
the FAKE_VLLM_* environment knobs that steer its misbehaviour."""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm_supervisor.sim import cuda

MISBEHAVIOURS = frozenset({
    "engine-ignores-term", "worker-hangs-shutdown", "api-ignores-term-during-startup",
    "worker-setsid", "grandchild-daemon", "grandchild-holds-stdout", "die-during-startup",
    "slow-startup", "rank-dies-in-collective",
})


class UsageError(Exception):
    """Bad command line or FAKE_VLLM_* value: exit 2."""


@dataclass
class Config:
    """Parsed command line plus FAKE_VLLM_* knobs.

    FAKE_VLLM_: MISBEHAVE (comma list of MISBEHAVIOURS), STARTUP_S, REQUEST_S, TERM_EXIT_CODE,
    EXIT_AFTER_S + EXIT_CODE, ORPHANS + ORPHAN_LIFE_S, LOG_LINES + LAST_LINE, PIDFILE,
    SIM_GPU_DIR + VRAM_MIB + VRAM_LEAK_MIB + VRAM_RELEASE_DELAY_S + NUM_GPUS; real CUDA memory:
    CUDA_MIB + NCCL + COLLECTIVE_AFTER_S (see ``_simulated_cuda``).
    """

    model: str
    host: str = "0.0.0.0"
    port: int = 8000
    tp: int = 1
    shutdown_timeout: float = 0.0
    misbehave: frozenset[str] = field(default_factory=frozenset)
    startup_s: float = 1.0
    request_s: float = 0.0
    term_exit_code: int = 0
    exit_after_s: float | None = None
    exit_code: int = 1
    orphans: int = 0
    orphan_life_s: float = 0.5
    log_lines: int = 0
    last_line: str | None = None
    pidfile: str | None = None
    gpu_dir: str | None = None
    vram_mib: int = 0
    vram_leak_mib: int = 0
    vram_release_delay_s: float = 0.0
    num_gpus: int = 0  # 0: one GPU per tensor-parallel rank
    cuda_mib: int = 0  # real CUDA memory per worker (_simulated_cuda)
    nccl: bool = False
    collective_after_s: float = 0.5
    nccl_port: int = 0  # picked by the engine before it forks the workers
    late_daemon_file: str | None = None  # TP0 forks an env-less, setsid daemon (pid here)
    late_daemon_s: float = 1.0  # this long after loading

    def has(self, name: str) -> bool:
        """Whether misbehaviour ``name`` is switched on."""
        return name in self.misbehave

    def fill_from_env(self, env) -> None:
        """Read the FAKE_VLLM_* knobs from ``env``."""
        names = {n.strip() for n in env.get("FAKE_VLLM_MISBEHAVE", "").split(",") if n.strip()}
        if names - MISBEHAVIOURS:
            unknown = ", ".join(sorted(names - MISBEHAVIOURS))
            raise UsageError(
                f"unknown FAKE_VLLM_MISBEHAVE name(s): {unknown} "
                f"(known: {', '.join(sorted(MISBEHAVIOURS))})"
            )
        self.misbehave = frozenset(names)
        self.startup_s = 3600.0 if self.has("slow-startup") else _env(env, "STARTUP_S", float, 1.0)
        self.request_s = _env(env, "REQUEST_S", float, 0.0)
        self.term_exit_code = _env(env, "TERM_EXIT_CODE", int, 0)
        self.exit_after_s = _env(env, "EXIT_AFTER_S", float, None)
        self.exit_code = _env(env, "EXIT_CODE", int, 1)
        self.orphans = _env(env, "ORPHANS", int, 0)
        self.orphan_life_s = _env(env, "ORPHAN_LIFE_S", float, 0.5)
        self.log_lines = _env(env, "LOG_LINES", int, 0)
        self.last_line = env.get("FAKE_VLLM_LAST_LINE")
        self.pidfile = env.get("FAKE_VLLM_PIDFILE") or None
        self.gpu_dir = env.get("FAKE_VLLM_SIM_GPU_DIR") or None
        self.vram_mib = _env(env, "VRAM_MIB", int, 0)
        self.vram_leak_mib = _env(env, "VRAM_LEAK_MIB", int, 0)
        self.vram_release_delay_s = _env(env, "VRAM_RELEASE_DELAY_S", float, 0.0)
        self.num_gpus = _env(env, "NUM_GPUS", int, 0) or self.tp
        self.cuda_mib = _env(env, "CUDA_MIB", int, 0)
        self.nccl = _env(env, "NCCL", int, 0) != 0
        self.collective_after_s = _env(env, "COLLECTIVE_AFTER_S", float, 0.5)
        self.late_daemon_file = env.get("FAKE_VLLM_LATE_DAEMON_FILE") or None
        self.late_daemon_s = _env(env, "LATE_DAEMON_S", float, 1.0)
        if problem := cuda.config_error(self):
            raise UsageError(problem)


def _env(env, name: str, conv, default):
    raw = env.get("FAKE_VLLM_" + name, "").strip()
    if not raw:
        return default
    try:
        return conv(raw)
    except ValueError:
        raise UsageError(f"FAKE_VLLM_{name}={raw!r} is not a valid {conv.__name__}") from None


# vLLM-style options this simulation reads; every other option is accepted and ignored.
_OPTIONS = {
    "--host": ("host", str),
    "--port": ("port", int),
    "--tensor-parallel-size": ("tp", int),
    "-tp": ("tp", int),
    "--shutdown-timeout": ("shutdown_timeout", float),
    "--model": ("model", str),
}


def parse_args(argv: list[str]) -> Config | None:
    """Parse ``serve MODEL [options]``; None means ``--version`` was asked for."""
    if argv[:1] in (["--version"], ["-v"]):
        return None
    if argv[:1] != ["serve"]:
        raise UsageError("usage: vllm serve MODEL [--host H] [--port N] [-tp N] ... | --version")
    values: dict[str, object] = {}
    rest, i = argv[1:], 0
    while i < len(rest):
        name, eq, value = rest[i].partition("=")
        if name in _OPTIONS:
            if not eq:
                i += 1
                if i == len(rest):
                    raise UsageError(f"{name} needs a value")
                value = rest[i]
            key, conv = _OPTIONS[name]
            try:
                values[key] = conv(value)
            except ValueError:
                raise UsageError(f"{name}: invalid value {value!r}") from None
        elif "model" not in values and not name.startswith("-") and (
            i == 0 or not rest[i - 1].startswith("-") or "=" in rest[i - 1]
        ):
            # The positional model tag; a bare word after an unknown option is its value.
            values["model"] = name
        i += 1
    if "model" not in values:
        raise UsageError("no model given (vllm serve MODEL ...)")
    cfg = Config(**values)
    if cfg.tp < 1 or not 0 <= cfg.port <= 65535:
        raise UsageError("--tensor-parallel-size must be >= 1 and --port in 0..65535")
    return cfg
