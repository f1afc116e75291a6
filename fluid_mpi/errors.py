"""Domain exceptions. Each one is caught by the CLI and printed as one line with exit code 2.

Who raises what:
- :class:`DataError` -- the data reader (missing, truncated, corrupt or mismatched MNIST files).
- :class:`CheckpointError` -- checkpoint load/save/export (wrong, truncated or foreign files).
- :class:`LaunchError` -- the MPI runtime at start-up (wrong number of ranks, bad options).
"""
from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Exit codes of ``fluid-mpi infer`` and ``fluid-mpi launch``; infer's also travel as the summary's
    ``exit_code`` and the ``stop`` event's. The one definition, used everywhere."""

    OK = 0  # every input answered (failures that were survived are in the summary)
    BAD_INPUT = 2  # bad input or options, before any work
    STOPPED = 3  # stopped after a failure that cannot be survived (every answer so far kept)
    SILENT = 4  # a device went silent and could not be excluded in-job: relaunch without it
    DRAINED = 5  # stopped at a safe point on request (SIGUSR2)
    INTERRUPTED = 130  # interrupted (Ctrl-C / SIGTERM to the launcher)


class FluidError(Exception):
    """Base class: an error the user can fix; the CLI prints it as one line and exits 2."""

    exit_code = ExitCode.BAD_INPUT


class DataError(FluidError):
    """A data file is missing, truncated, corrupt or does not match its canonical checksum."""


class CheckpointError(FluidError):
    """A checkpoint or per-rank export is missing, truncated, of another format or inconsistent."""


class LaunchError(FluidError):
    """The MPI launch does not fit the checkpoint or the options (e.g. -np differs from K)."""


class PeerFailure(Exception):
    """Raised by the transport when a peer died or the communicator was revoked (ULFM). Not a user
    error: the runtime loops catch it, recover (revoke + shrink) and re-send, or stop cleanly."""

    def __init__(self, message: str, ranks: tuple[int, ...] = ()):
        super().__init__(message)
        self.ranks = ranks  # world ranks known to have failed, when the transport could tell


class RecoveryFailed(Exception):
    """Raised by the transport's ``shrink`` when the survivors cannot agree within the deadline (a live
    process that takes no part: frozen on a host this rank cannot see) or the shrink itself failed.
    The runtime loops catch it and stop cleanly (exit 3); nothing blocks forever."""


class DeviceSilent(Exception):
    """Raised by the coordinator's liveness check when a rank can neither be heard nor killed and
    excluded in-job (cable pulled, frozen board). The coordinator stops with exit 4, naming the hosts,
    so that ``fluid-mpi launch`` relaunches without them."""

    def __init__(self, message: str, ranks: list[int], hosts: list[str]):
        super().__init__(message)
        self.ranks, self.hosts = ranks, hosts
