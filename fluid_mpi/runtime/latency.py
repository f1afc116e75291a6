"""Latency per answered input (arrival to answer) as percentiles, and the largest backlog seen: what a
run's summary reports under ``latency_ms`` and ``max_backlog``."""
from __future__ import annotations

import numpy as np


class LatencyStats:
    """Latency per answered item (from its arrival to its answer) and the largest backlog seen."""

    def __init__(self) -> None:
        self._latencies: list[np.ndarray] = []  # seconds, one array per call
        self._n = 0
        self.max_backlog = 0

    def record(self, arrived: float, answered: float) -> float:
        """Record one answer; returns its latency in ms (for the prediction line)."""
        latency = max(0.0, answered - arrived)
        self.record_many(np.array([arrived]), answered)
        return latency * 1000.0

    def record_many(self, arrived: np.ndarray, answered: float) -> None:
        """Record the answers of a batch, all given at ``answered``."""
        if len(arrived):
            self._latencies.append(np.maximum(0.0, answered - np.asarray(arrived, dtype=np.float64)))
            self._n += len(arrived)

    def note_backlog(self, n: int) -> None:
        """Note the current backlog (arrived, not yet answered); keeps the maximum."""
        self.max_backlog = max(self.max_backlog, int(n))

    def __len__(self) -> int:
        return self._n

    def percentiles(self) -> dict[str, float | None]:
        """``{"p50", "p95", "p99"}`` in ms (numpy's linear percentile); None each when nothing answered."""
        if not self._n:
            return {"p50": None, "p95": None, "p99": None}
        p = np.percentile(np.concatenate(self._latencies), [50, 95, 99]) * 1000.0
        return {"p50": round(float(p[0]), 3), "p95": round(float(p[1]), 3), "p99": round(float(p[2]), 3)}

    def summary(self) -> dict:
        """For the run summary: ``{"latency_ms": {p50, p95, p99}, "max_backlog": n, "answered": n}``."""
        return {"latency_ms": self.percentiles(), "max_backlog": self.max_backlog, "answered": len(self)}
