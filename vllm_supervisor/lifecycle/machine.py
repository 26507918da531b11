"""The lifecycle's states and the only edges between them. Every change of state goes
through Lifecycle.transition(), which refuses an edge not in EDGES (a bug, not a user
error) and tells the listeners (the metrics, the GPU booking, the demo's timed stop)."""

from __future__ import annotations

import enum
from typing import Protocol


class State(enum.Enum):
    """Lifecycle states (docs/architecture.md has the diagram)."""

    ADMITTING = "admitting"  # waiting for the GPUs (reservations, free memory)
    LAUNCHING = "launching"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    KILLING = "killing"
    AWAITING_VRAM = "awaiting-vram"
    DONE = "done"


EDGES: dict[State, frozenset[State]] = {
    State.ADMITTING: frozenset({State.LAUNCHING}),
    State.LAUNCHING: frozenset({State.STARTING}),
    State.STARTING: frozenset({State.READY, State.STOPPING}),
    State.READY: frozenset({State.STOPPING}),
    State.STOPPING: frozenset({State.KILLING, State.AWAITING_VRAM}),
    State.KILLING: frozenset({State.AWAITING_VRAM}),
    State.AWAITING_VRAM: frozenset({State.DONE}),
    State.DONE: frozenset(),
}
RUNNING = frozenset({State.STARTING, State.READY})  # no stop has begun
STOPPING = frozenset({State.STOPPING, State.KILLING})  # the tree is being stopped


class IllegalTransition(RuntimeError):
    """A change of state that the lifecycle does not have: a bug in the supervisor."""


class Listener(Protocol):
    """Told of every change of state, after it happened."""

    def on_transition(self, old: State, new: State) -> None: ...


class Lifecycle:
    """The current state, changed only along EDGES."""

    def __init__(self, listeners: tuple[Listener, ...] = ()):
        self.state = State.ADMITTING
        self._listeners = list(listeners)

    def transition(self, new: State) -> None:
        """Move to NEW; IllegalTransition if the current state has no edge to it."""
        old = self.state
        if new not in EDGES[old]:
            raise IllegalTransition(f"no lifecycle edge {old.value} -> {new.value}")
        self.state = new
        for listener in self._listeners:
            listener.on_transition(old, new)

    def add_listener(self, listener: Listener) -> None:
        """Tell LISTENER of every later change."""
        self._listeners.append(listener)
