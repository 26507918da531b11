"""The simulated vLLM's settings: its command line (`serve MODEL --port N -tp N ...`) and
the FAKE_VLLM_* environment knobs that steer its misbehaviour, plus the few real vLLM
environment variables it honours (VLLM_API_KEY, VLLM_SERVER_DEV_MODE,
VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS)."""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm_supervisor.sim import cuda

MISBEHAVIOURS = frozenset({
    "engine-ignores-term", "worker-hangs-shutdown", "api-ignores-term-during-startup",
    "worker-setsid", "grandchild-daemon", "grandchild-holds-stdout", "die-during-startup",
    "slow-startup", "rank-dies-in-collective", "worker-deadlock", "long-prefill",
})
# --runner/--task/--convert values that make vLLM a pooling (embedding) server.
POOLING_TASKS = frozenset({"embed", "embedding", "classify", "score", "reward", "pooling"})


class UsageError(Exception):
    """Bad command line or FAKE_VLLM_* value: exit 2."""


@dataclass
class Config:
    """Parsed command line plus FAKE_VLLM_* knobs.

    FAKE_VLLM_: MISBEHAVE (comma list of MISBEHAVIOURS), STARTUP_S, REQUEST_S (time the API
    server spends on a request before the engine sees it), STEP_S (one engine step),
    HANG_AFTER_S (worker-deadlock), PREFILL_S + PREFILL_METRICS (long-prefill, see
    ``batching``), TERM_EXIT_CODE, EXIT_AFTER_S + EXIT_CODE, ORPHANS + ORPHAN_LIFE_S,
    LOG_LINES + LAST_LINE, PIDFILE, SIM_GPU_DIR + VRAM_MIB + VRAM_LEAK_MIB +
    VRAM_RELEASE_DELAY_S + NUM_GPUS; real CUDA memory: CUDA_MIB + NCCL + COLLECTIVE_AFTER_S
    (see ``cuda``).

    CHECK_FREE=1 (default 0): as vLLM's worker does at startup (gpu_worker.py init_device),
    each worker, as it starts (before its STARTUP_S of loading, so before it allocates),
    checks that its GPU's free memory is at least what it is about to take: VRAM_MIB on the
    simulated GPU ``rank % NUM_GPUS`` of SIM_GPU_DIR (free = total - used as a fresh
    ``gpu.SimulatedGpuProbe`` reads it: base, leaks and live holders count, and so does a
    dead holder with a release delay) and/or CUDA_MIB on its CUDA device (free from
    ``torch.cuda.mem_get_info``). Short of either, it logs "WorkerProc failed to start."
    and raises ``ValueError: Free memory on device
    (X/Y GiB) on startup is less than desired GPU memory utilization (Z GiB). ...`` (stderr):
    the worker dies during startup, so the engine and then the API server exit 1 before
    /health ever answers 200.

    STOP_S=N (seconds, default 0): a slow orderly teardown. A worker told to stop by SIGTERM
    (the engine's shutdown, or a signal to the group) takes N more seconds before it exits,
    still holding its memory (its alloc file stays valid, its CUDA tensors stay allocated);
    TP0 logs "shutdown: taking N s (FAKE_VLLM_STOP_S)". The engine waits for its workers,
    and the API server gives the engine N seconds more than its usual grace, so the server
    exits as usual, only N seconds later. A worker whose engine vanished does not wait.
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
    check_free: bool = False  # workers check free GPU memory before loading, as vLLM
    stop_s: float = 0.0  # extra seconds workers take to stop on SIGTERM, memory held
    nccl_port: int = 0  # picked by the engine before it forks the workers
    late_daemon_file: str | None = None  # TP0 forks an env-less, setsid daemon (pid here)
    late_daemon_s: float = 1.0  # this long after loading
    step_s: float = 0.01
    hang_after_s: float = 1.0
    prefill_s: float = 30.0
    prefill_metrics: str = "vllm"  # or "chunks": every prefill chunk counted (not vLLM)
    execute_timeout_s: float = 300.0  # VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS
    # vLLM options
    served_names: list[str] = field(default_factory=list)  # --served-model-name
    api_keys: list[str] = field(default_factory=list)  # --api-key, else VLLM_API_KEY
    runner: str = "auto"
    convert: str = "auto"
    task: str = "auto"  # removed from vLLM 0.32; older versions' --task embed
    max_num_seqs: int = 256
    enable_sleep_mode: bool = False
    disable_log_stats: bool = False
    dev_mode: bool = False  # VLLM_SERVER_DEV_MODE=1: /sleep, /wake_up, /is_sleeping

    @property
    def served_name(self) -> str:
        """The model name /v1/models and the metrics' model_name label show."""
        return self.served_names[0] if self.served_names else self.model

    @property
    def pooling(self) -> bool:
        """Whether vLLM would run this as a pooling (embedding) model."""
        return bool({self.runner, self.convert, self.task} & POOLING_TASKS)

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
        self.check_free = _env(env, "CHECK_FREE", int, 0) != 0
        self.stop_s = _env(env, "STOP_S", float, 0.0)
        if self.stop_s < 0:
            raise UsageError("FAKE_VLLM_STOP_S must be >= 0")
        self.late_daemon_file = env.get("FAKE_VLLM_LATE_DAEMON_FILE") or None
        self.late_daemon_s = _env(env, "LATE_DAEMON_S", float, 1.0)
        self.step_s = _env(env, "STEP_S", float, 0.01)
        self.hang_after_s = _env(env, "HANG_AFTER_S", float, 1.0)
        self.prefill_s = _env(env, "PREFILL_S", float, 30.0)
        self.prefill_metrics = env.get("FAKE_VLLM_PREFILL_METRICS", "").strip() or "vllm"
        if self.prefill_metrics not in ("vllm", "chunks"):
            raise UsageError("FAKE_VLLM_PREFILL_METRICS must be 'vllm' or 'chunks'")
        raw = env.get("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", "").strip()
        self.execute_timeout_s = _number("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", raw, 300.0)
        if not self.api_keys and env.get("VLLM_API_KEY"):
            self.api_keys = [env["VLLM_API_KEY"]]  # --api-key takes precedence, as in vLLM
        self.dev_mode = _number("VLLM_SERVER_DEV_MODE", env.get("VLLM_SERVER_DEV_MODE", ""),
                                0) != 0
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


def _number(name: str, raw: str, default: float) -> float:
    try:
        return float(raw) if raw.strip() else default
    except ValueError:
        raise UsageError(f"{name}={raw!r} is not a number") from None


# vLLM-style options this simulation reads; every other option is accepted and ignored.
_OPTIONS = {
    "--host": ("host", str),
    "--port": ("port", int),
    "--tensor-parallel-size": ("tp", int),
    "-tp": ("tp", int),
    "--shutdown-timeout": ("shutdown_timeout", float),
    "--model": ("model", str),
    "--runner": ("runner", str),
    "--convert": ("convert", str),
    "--task": ("task", str),
    "--max-num-seqs": ("max_num_seqs", int),
}
# Options taking one or more values (argparse nargs="+").
_LISTS = {"--served-model-name": "served_names", "--api-key": "api_keys"}
# Boolean flags (each also as --no-FLAG).
_FLAGS = {"--enable-sleep-mode": "enable_sleep_mode", "--disable-log-stats": "disable_log_stats"}


def parse_args(argv: list[str]) -> Config | None:
    """Parse ``serve MODEL [options]``; None means ``--version`` was asked for."""
    if argv[:1] in (["--version"], ["-v"]):
        return None
    if argv[:1] != ["serve"]:
        raise UsageError("usage: vllm serve MODEL [--host H] [--port N] [-tp N] ... | --version")
    values: dict[str, object] = {}
    rest, i, unknown_before = argv[1:], 0, False
    while i < len(rest):
        name, eq, value = rest[i].partition("=")
        flag = _FLAGS.get(name) or _FLAGS.get(name.replace("--no-", "--", 1))
        if flag:
            values[flag] = name in _FLAGS
        elif name in _LISTS:
            got = [value] if eq else []
            while not eq and i + 1 < len(rest) and not rest[i + 1].startswith("-"):
                i += 1
                got.append(rest[i])
            if not got:
                raise UsageError(f"{name} needs a value")
            values[_LISTS[name]] = got
        elif name in _OPTIONS:
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
        elif "model" not in values and not name.startswith("-") and not unknown_before:
            values["model"] = name  # the positional model tag
        # A bare word right after an unknown option is taken as that option's value.
        unknown_before = name.startswith("-") and not eq and not flag and \
            name not in _LISTS and name not in _OPTIONS
        i += 1
    if "model" not in values:
        raise UsageError("no model given (vllm serve MODEL ...)")
    cfg = Config(**values)
    if cfg.tp < 1 or not 0 <= cfg.port <= 65535 or cfg.max_num_seqs < 1:
        raise UsageError("--tensor-parallel-size and --max-num-seqs must be >= 1 and --port "
                         "in 0..65535")
    return cfg
