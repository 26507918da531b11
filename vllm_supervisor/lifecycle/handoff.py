"""`serve --replace NAME`: the redeploy in one command. Take a place in the reservation
table beside NAME's own entry (so no third start can slip in when NAME lets go), stop NAME
with the full verified stop, and go on only if its VRAM verdict is "released"."""

from __future__ import annotations

from vllm_supervisor.errors import ExitCode, SupervisorError
from vllm_supervisor.instances import commands
from vllm_supervisor.instances.records import RecordError, read_record
from vllm_supervisor.instances.statedir import existing_state_dir

REPLACE_POLL_S = 0.002  # how often the old supervisor's end is looked for


def replace(state_dir, old_name: str, booking, probe, ui) -> dict | None:
    """Stop OLD_NAME for its successor; its report, or None when nothing ran under that
    name. Raises exit 6 when its GPU memory did not come back (the successor must not
    start into it), exit 3 when it could not be stopped."""
    d = existing_state_dir(state_dir)
    path = d / f"{old_name}.json" if d is not None else None
    try:
        rec = read_record(path) if path is not None and path.exists() else None
    except RecordError as e:
        raise SupervisorError(f"cannot replace {old_name}: {e.one_line()}", None,
                              ExitCode.START_FAILED) from None
    if rec is None:
        ui.event(f"--replace {old_name}: no such instance; starting")
        return None
    if booking is not None:
        old = booking.reserve_for_replace(rec.supervisor.ident)
        ui.event(f"--replace {old_name}: GPUs reserved beside its own reservation"
                 if old else f"--replace {old_name}: it holds no GPU reservation")
    ui.event(f"--replace {old_name}: stopping it (the full verified stop)")
    result = commands.stop(state_dir, [old_name], False, None, probe, REPLACE_POLL_S)[0]
    if result.get("missing"):
        ui.event(f"--replace {old_name}: it stopped by itself meanwhile; starting")
        return None
    status = _vram_status(result)
    if "error" in result:
        _give_up(booking)
        raise SupervisorError(f"--replace {old_name}: could not stop it: {result['error']}",
                              None, ExitCode.START_FAILED)
    if status != "released" and not (status == "unavailable" and probe.available()):
        _give_up(booking)
        raise SupervisorError(f"--replace {old_name}: its stop ended with VRAM {status}, so "
                              "the new instance was not started",
                              "see `vllm-supervise status`; `vllm-supervise cleanup` once "
                              "the memory is back", ExitCode.VRAM_NOT_RELEASED)
    vram = result.get("vram")
    if booking is not None and isinstance(vram, dict):
        booking.handoff_from = (old_name, vram.get("verdict_wall"))
    ui.event(f"--replace {old_name}: stopped, VRAM released")
    return result


def _vram_status(result: dict) -> str:
    vram = result.get("vram")
    if isinstance(vram, dict):
        return str(vram.get("status"))
    return str(vram or "none").split(":", 1)[0].strip()


def _give_up(booking) -> None:
    if booking is not None:
        booking.release()
