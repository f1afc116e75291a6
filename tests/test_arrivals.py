"""Arrivals over time (fluid_mpi.runtime.arrivals): Poisson offsets, replay and stdin sources, latency."""
from __future__ import annotations

import io
import os
import threading

import numpy as np
import pytest

from fluid_mpi.errors import DataError
from fluid_mpi.runtime.latency import LatencyStats
from fluid_mpi.runtime.arrivals import (Item, ReplaySource, StdinSource,
                                        poisson_offsets)


def test_poisson_offsets_mean_and_reproducible():
    off = poisson_offsets(20000, 50.0, seed=3)
    assert off.shape == (20000,) and np.all(np.diff(off) >= 0) and off[0] > 0
    assert np.diff(off).mean() == pytest.approx(1 / 50.0, rel=0.03)
    assert np.array_equal(off, poisson_offsets(20000, 50.0, seed=3))
    assert not np.array_equal(off, poisson_offsets(20000, 50.0, seed=4))
    assert not poisson_offsets(7, None, seed=0).any() and not poisson_offsets(7, 0.0, seed=0).any()
    assert len(poisson_offsets(0, 10.0, seed=0)) == 0


def test_replay_source_releases_on_time_and_in_order():
    images = np.arange(5 * 28 * 28, dtype=np.uint8).reshape(5, 28, 28)
    offsets = np.array([0.0, 0.5, 0.5, 1.2, 3.0])
    src = ReplaySource(images, [f"n{i}" for i in range(5)], offsets, t0=100.0, clock=lambda: 100.0)
    assert src.poll(99.9) == []
    got = src.poll(100.0)
    assert [i.key for i in got] == [0] and got[0].name == "n0" and got[0].arrived == 100.0
    assert src.next_due() == 100.5 and not src.exhausted()
    got = src.poll(101.0)  # polled late: arrival times stay the scheduled ones
    assert [(i.key, i.arrived) for i in got] == [(1, 100.5), (2, 100.5)]
    assert np.array_equal(got[1].image, images[2]) and got[1].error is None
    assert src.poll(101.0) == []  # nothing twice
    assert [i.key for i in src.poll(110.0)] == [3, 4]
    assert src.exhausted() and src.next_due() is None and src.poll(200.0) == []


def test_replay_source_wait_sleeps_until_next_arrival_at_most_timeout():
    slept: list[float] = []
    now = [10.0]
    src = ReplaySource(np.zeros((2, 28, 28), np.uint8), ["a", "b"], np.array([0.25, 5.0]), t0=10.0,
                       sleep=slept.append, clock=lambda: now[0])
    src.wait(1.0)
    assert slept == [pytest.approx(0.25)]
    src.poll(10.3)
    now[0] = 10.3
    src.wait(1.0)
    assert slept[-1] == pytest.approx(1.0)  # next one is 4.7 s away: capped by the timeout
    with pytest.raises(ValueError):
        ReplaySource(np.zeros((2, 28, 28), np.uint8), ["a"], np.zeros(2), t0=0.0)


def _fake_decode(path: str) -> np.ndarray:
    if "bad" in path:
        raise DataError(f"{path}: not a readable image")
    return np.full((28, 28), len(path), dtype=np.uint8)


def test_stdin_source_good_bad_blank_and_eof():
    ticks = iter(range(100))
    src = StdinSource(io.StringIO("one.png\n\n  bad.png \ntwo.png\n"), decode=_fake_decode,
                      clock=lambda: float(next(ticks)))
    src.join(5)
    assert not src.exhausted()  # read to EOF, but not yet polled
    assert [i.key for i in src.poll(0.0)] == [0]  # only what arrived by t=0
    items = src.poll(10.0)
    assert [(i.key, i.name, i.arrived) for i in items] == [(1, "bad.png", 1.0), (2, "two.png", 2.0)]
    assert items[0].image is None and "not a readable image" in items[0].error
    assert items[1].error is None and items[1].image.shape == (28, 28)
    assert src.exhausted() and src.poll(20.0) == []


def test_stdin_source_from_a_pipe_as_lines_arrive(tmp_path):
    from PIL import Image

    good = tmp_path / "seven.png"
    Image.new("L", (40, 40), 0).save(good)
    r, w = os.pipe()
    reader, writer = os.fdopen(r, "r"), os.fdopen(w, "w")
    src = StdinSource(reader)  # the real decoder
    src.wait(0.05)
    assert src.poll(float("inf")) == [] and not src.exhausted()  # nothing written yet: not at EOF
    writer.write(f"{good}\n")
    writer.flush()
    got: list[Item] = []
    for _ in range(100):  # up to 5 s, normally one round
        src.wait(0.05)
        got += src.poll(float("inf"))
        if got:
            break
    assert got and got[0].name == str(good) and got[0].image.shape == (28, 28)
    writer.write(f"{tmp_path / 'missing.png'}\n")
    writer.close()
    src.join(5)
    last = src.poll(float("inf"))
    assert len(last) == 1 and last[0].key == 1 and last[0].image is None and "no such file" in last[0].error
    assert src.exhausted()
    reader.close()


def test_stdin_source_reader_failure_is_raised_by_poll():
    class Broken(io.StringIO):
        def __iter__(self):
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")

    src = StdinSource(Broken(), decode=_fake_decode)
    src.join(5)
    with pytest.raises(DataError, match="stdin"):
        src.poll(0.0)
    assert not src.exhausted()


def test_latency_stats_percentiles_and_backlog():
    stats = LatencyStats()
    assert stats.percentiles() == {"p50": None, "p95": None, "p99": None}
    for i in range(100):
        assert stats.record(10.0, 10.0 + (i + 1) / 1000.0) == pytest.approx(i + 1)  # 1..100 ms
    p = stats.percentiles()
    ref = np.percentile(np.arange(1, 101), [50, 95, 99])
    assert [p["p50"], p["p95"], p["p99"]] == pytest.approx(list(ref))
    for n in (3, 17, 5):
        stats.note_backlog(n)
    s = stats.summary()
    assert s["max_backlog"] == 17 and s["answered"] == 100 and s["latency_ms"] == p


def test_stdin_source_is_thread_safe_under_concurrent_polls():
    lines = "".join(f"img{i}.png\n" for i in range(500))
    src = StdinSource(io.StringIO(lines), decode=_fake_decode)
    seen: list[int] = []

    def drain():
        while not src.exhausted():
            seen.extend(i.key for i in src.poll(float("inf")))
            src.wait(0.01)

    threads = [threading.Thread(target=drain) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert sorted(seen) == list(range(500))


def test_step_load_schedule_follows_each_segments_rate():
    from fluid_mpi.runtime.arrivals import parse_rate, schedule_offsets

    assert parse_rate(None) is None and parse_rate("250") == [(250.0, float("inf"))]
    segments = parse_rate("500@2,4000@0.5,500")
    assert segments == [(500.0, 2.0), (4000.0, 0.5), (500.0, float("inf"))]
    o = schedule_offsets(4000, segments, seed=3)
    assert len(o) == 4000 and np.all(np.diff(o) >= 0)
    assert 900 <= (o < 2).sum() <= 1100  # ~500/s for 2 s
    assert 1800 <= ((o >= 2) & (o < 2.5)).sum() <= 2200  # ~4000/s for 0.5 s
    tail = o[o >= 2.5]
    assert abs(len(tail) / (tail[-1] - 2.5) - 500) < 60  # back to ~500/s
    assert np.array_equal(o, schedule_offsets(4000, segments, seed=3))  # the seed fixes the stream
    for bad in ("x", "0", "100@0,5", "100,200@1"):
        with pytest.raises(DataError):
            parse_rate(bad)
