"""The elastic driver's book of hosts (as Horovod's ``HostManager`` keeps one): for each host of the
hostfile, whether it is lost and why, when it answered again, and how it fared in the current attempt's
probes. Plain data; the driver makes the decisions."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from .elastic_parts import Failure


@dataclass
class HostState:
    """What the driver knows of one host."""

    lost: Failure | None = None  # why it is left out of attempts; None while it is in use
    returned_at: float | None = None  # lost, then a probe answered again at this (monotonic) time
    misses: int = 0  # probes in a row that this attempt's host did not answer
    answering: bool = False  # lost, and usable again at the last probe


class HostTable:
    """Every host of the hostfile, in its order (rank order: the first one coordinates)."""

    def __init__(self, hosts: Sequence[str]):
        self.order = list(hosts)
        self.state = {h: HostState() for h in self.order}

    def lost(self) -> dict[str, Failure]:
        """Lost hosts (hostfile order) and why."""
        return {h: s.lost for h in self.order if (s := self.state[h]).lost is not None}

    def active(self, np_: int) -> list[str]:
        """The hosts of the next attempt: hostfile order, lost ones left out, at most ``np_``."""
        return [h for h in self.order if self.state[h].lost is None][:np_]

    def new_attempt(self) -> None:
        """Probe counts and answers are per attempt."""
        for s in self.state.values():
            s.misses, s.answering = 0, False

    def note_probe(self, hosts: Iterable[str], answers: dict[str, bool]) -> int:
        """Count this attempt's hosts' missed probes; returns the longest run of misses."""
        worst = 0
        for h in hosts:
            s = self.state[h]
            s.misses = 0 if answers.get(h, False) else s.misses + 1
            worst = max(worst, s.misses)
        return worst

    def answering(self) -> list[str]:
        """Lost hosts that were usable at the last probe."""
        return [h for h in self.order if self.state[h].lost is not None and self.state[h].answering]

    def mark_returned(self, hosts: Iterable[str], now: float) -> list[str]:
        """Note when each host first answered again; returns those seen for the first time."""
        new = [h for h in hosts if self.state[h].returned_at is None]
        for h in new:
            self.state[h].returned_at = now
        return new

    def take_back(self, host: str, now: float) -> tuple[Failure, float]:
        """A lost host rejoins: (why it was lost, when it answered again); its record is cleared."""
        s = self.state[host]
        lost, returned = s.lost, s.returned_at if s.returned_at is not None else now
        s.lost, s.returned_at, s.answering = None, None, False
        assert lost is not None, f"{host} was not lost"
        return lost, returned
