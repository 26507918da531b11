"""The metrics endpoint: prometheus_client's own HTTP server, in a thread that takes no
signal (the loop takes them with sigtimedwait), bound before anything is launched, so
that a port in use is refused at once and its holder named."""

from __future__ import annotations

import errno
import signal
import socket

from prometheus_client import start_http_server

from vllm_supervisor.errors import ExitCode, SupervisorError
from vllm_supervisor.host.preflight import port_holder


class PortInUse(SupervisorError):
    """The metrics port is held by another process (named in the message)."""


class MetricsServer:
    """A bound, serving endpoint; close() ends it."""

    def __init__(self, registry, host: str, port: int):
        # The server thread is started with every signal blocked, which it keeps (as the
        # output writers do): a stop signal must reach the loop, not kill a thread.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        try:
            self._httpd, self._thread = start_http_server(port, host, registry)
        except socket.gaierror as e:
            raise SupervisorError(f"--metrics-host {host!r}: {e.strerror}",
                                  "give an address of this machine, e.g. 127.0.0.1",
                                  ExitCode.USAGE) from None
        except OSError as e:
            raise _bind_error(host, port, e) from None
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        self.host, self.port = host, self._httpd.server_address[1]

    def close(self) -> None:
        """Stop serving and free the port."""
        self._httpd.shutdown()
        self._httpd.server_close()


def _bind_error(host: str, port: int, e: OSError) -> SupervisorError:
    if e.errno == errno.EADDRINUSE:
        who = port_holder(port) or "another process"
        return PortInUse(f"metrics port {port} is already in use by {who}",
                         "give another --metrics-port, or stop that process",
                         ExitCode.START_FAILED)
    return SupervisorError(f"cannot serve metrics on {host}:{port}: {e.strerror}",
                           "check --metrics-host and --metrics-port (below 1024 needs "
                           "root)", ExitCode.START_FAILED)
