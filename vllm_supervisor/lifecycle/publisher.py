"""The supervisor's side of its instance record: written at launch and on each change, so
that `status`, `stop` and `cleanup` see the tree even after the supervisor died. A full or
vanished state dir is a warning, never a reason to stop supervising."""

from __future__ import annotations

from vllm_supervisor.lifecycle.ports import EventSink, RecordSink


class Publisher:
    """Wraps the record sink (None: no record is kept, as in the unit tests)."""

    def __init__(self, sink: RecordSink | None, ui: EventSink):
        self._sink = sink
        self._ui = ui
        self._warned = False

    def launched(self, **fields) -> None:
        """The first record, right after launch."""
        self._call("launched", fields)

    def update(self, **fields) -> None:
        """Changed fields."""
        self._call("update", fields)

    def stop_request(self) -> float | None:
        """The grace a `vllm-supervise stop` asked for, if any."""
        if self._sink is None:
            return None
        try:
            return self._sink.stop_request()
        except OSError:
            return None

    def _call(self, method: str, fields: dict) -> None:
        if self._sink is None:
            return
        try:
            getattr(self._sink, method)(**fields)
        except OSError as e:
            if not self._warned:  # once: a full disk would otherwise flood the log
                self._ui.event(f"could not update the instance record: {e.strerror}", "warn")
                self._warned = True
