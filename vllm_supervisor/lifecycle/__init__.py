"""The supervisor: its state machine (machine.py), the loop that composes the
collaborators (supervisor.py), the stop sequence, the serving checks, restarts and the
report. Acts on the world only through the host port (ports.py) and the clock."""
