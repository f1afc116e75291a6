"""The data path check: a host is usable only if it can open a TCP connection to the launcher's host on
the network MPI uses, not merely run a command when ssh (or the launch agent) asks.

On many clusters ssh runs over a management network of its own, or a firewall lets ssh through and blocks
MPI's ports; such a host answers a plain probe, yet every mpirun that includes it fails (its daemon never
reports back). So the launcher listens on a TCP port of its own host, and each probe runs, on the host,
a connection to that port by the launcher's name as the host resolves it. A host whose data cable is
pulled answers ssh and fails this probe: it is left out, and rejoins when the connection works again."""
from __future__ import annotations

import socket
import threading

# The probe's connection gets 0.5 s: a SYN is answered by the kernel within a millisecond on a LAN, even on a
# loaded Pi; a pulled data cable drops it, and the probe (a Python start on the host included) must stay
# well inside hosts.PROBE_TIMEOUT_S (2 s) and the 1 s between probes.
CONNECT_TIMEOUT_S = 0.5
_CONNECT = ("import socket, sys; "
            "socket.create_connection((sys.argv[1], int(sys.argv[2])), float(sys.argv[3])).close()")


class DataPathListener:
    """A listening TCP socket on this host (all interfaces, a free port) that accepts and closes every
    connection, in a daemon thread; ``close`` stops it. ``address`` is how the hosts reach this host."""

    def __init__(self, address: str | None = None):
        self.address = address or socket.gethostname()
        self._sock = socket.create_server(("", 0), family=socket.AF_INET, backlog=64)
        self.port = self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, name="data-path", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:  # closed
                return
            conn.close()

    def probe_command(self, python: str) -> list[str]:
        """What a host runs to show its data path works: exit 0 when it connected."""
        return [python, "-c", _CONNECT, self.address, str(self.port), str(CONNECT_TIMEOUT_S)]

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._thread.join(timeout=1)
