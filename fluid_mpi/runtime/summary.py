"""The run's summary (``--summary PATH``, JSON, written atomically) and its few human-readable lines."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class Summary:
    """The JSON summary of one run (``--summary``), built from the sink and the event log."""

    family: str
    mode: str
    checkpoint: str
    data: str
    batch_size: int
    combine: str | None
    width_start: int | None
    width_end: int | None
    ranks_start: int
    ranks_end: int
    images: int
    answered: int
    answered_here: int
    resumed: int
    torn_lines_repaired: int
    duplicates: int
    correct: int
    accuracy: float | None  # over the answers whose label is known (None: no labels, e.g. the user's images)
    # per answerer, labelled answers only: {"0+1": {"answered", "accuracy"}, "1": ...}: HA's head and the HT
    # groups' own heads side by side, and what each survivor subset answered after a failure
    accuracy_by: dict
    elapsed_s: float
    images_per_s: float
    latency_ms: dict | None
    max_backlog: int
    errors: int
    by_mode: dict | None
    status: str
    exit_code: int
    message: str
    failures: list[dict]
    events: list[dict]
    timeline: list
    takeover: dict | None = None
    ha_deadline: dict | None = None  # --ha-deadline-ms: answers per subset, late features dropped, skips

    def to_dict(self) -> dict:
        return asdict(self)


def write_summary(path: str | os.PathLike | None, summary: dict) -> None:
    """Write the JSON summary atomically."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def human_summary(s: dict) -> str:
    """A few readable lines for stdout."""
    acc = "no labels" if s["accuracy"] is None else f"accuracy {s['accuracy']:.2f} %"
    lat = s.get("latency_ms") or {}
    lines = [f"{s['family']} {s.get('mode') or ''} on {s['ranks_start']} rank(s): status {s['status']}",
             f"  answered {s['answered']}/{s['images'] if s['images'] is not None else '?'} inputs, {acc}, "
             f"{s['images_per_s']:.1f} images/s in {s['elapsed_s']:.2f} s, duplicates {s['duplicates']}"
             + (f", unreadable {s['errors']}" if s.get("errors") else "")]
    by = s.get("accuracy_by") or {}
    if len(by) > 1:
        lines.append("  accuracy by answerer: " + ", ".join(f"{k} {v['accuracy']:.2f} % ({v['answered']})"
                                                         for k, v in by.items()))
    if lat.get("p50") is not None:
        lines.append(f"  latency p50 {lat['p50']:.2f} ms, p95 {lat['p95']:.2f} ms, p99 {lat['p99']:.2f} ms"
                     + (f"; batches by mode {s['by_mode']}" if s.get("by_mode") else ""))
    if s.get("ha_deadline"):
        d = s["ha_deadline"]
        lines.append(f"  HA deadline {d['deadline_ms']:g} ms: answers by subset {d['answers_by_subset']}, "
                     f"{d['late_features_dropped']} late feature batch(es) dropped")
    for f in s.get("failures", []):
        lines.append(f"  failure: rank {f['rank']} on {f.get('host', '?')} ({f.get('fault')}, "
                     f"{f.get('how', '?')}) after batch {f.get('after_batch')}, detected in "
                     f"{f.get('detected_ms')} ms; continued on {s['ranks_end']} rank(s)")
    if s.get("message"):
        lines.append(f"  {s['message']}")
    return "\n".join(lines)
