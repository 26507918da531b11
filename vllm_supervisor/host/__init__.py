"""The OS boundary: spawning in a new session, /proc, process identity, signals, reaping,
the death guard, leftover files, the /health and log threads. linux.py is the host port
the lifecycle runs on."""
