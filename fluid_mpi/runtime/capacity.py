"""HA's capacity for ``--mode auto``, measured live: the service-time model :class:`Capacity` and the
coordinator's busy time per HA batch, :class:`ServiceClock` (plain Python, no torch, no MPI; every time
comes from the caller). docs/adaptive.md explains both and the figures behind their constants.
"""
from __future__ import annotations


class Capacity:
    """Images/s of one mode at full batches, from a service-time model: a batch of ``n`` images takes
    ``t(n) = overhead + per_image × n`` seconds, so the capacity is ``B / t(B)`` for the full batch ``B``.

    Why a model and not images/seconds of each batch: the coordinator cuts a batch from whatever has
    arrived, so at a light load every batch is small and its own images/s is about the arrival rate (the
    queue empties as fast as it fills), far below what full batches give.

    The first line comes from the start-up probe (two timed sizes, :meth:`from_timings`). Then the line is
    fitted to the answered batches' ``(n, seconds)`` (a lone stalled batch left out, :attr:`STALL`) by least
    squares, exponentially weighted (``alpha`` per batch). When the recent batches are too alike in size to give
    a slope (all small at a light load, all full when saturated) or too few, the slope is kept and only the
    line's level is fitted: through their weighted mean. A fit with a slope <= 0 or an overhead < 0 (noise) is
    treated the same way. (The probe's points are not mixed into the fit: on a busy machine its overhead can be
    several ms off, and a line through it and small live batches bends the slope, 40 % off in the tests.)
    """

    # Weight of each new batch: ~20 batches of memory (~160 ms of saturated HA on 2 cores, a few tens of ms
    # of small batches), enough to average out a batch hit by a 4-10 ms context switch on a shared core,
    # short enough to follow a real slowdown (other jobs taking the cores) within a fraction of a second.
    ALPHA = 0.05
    # A slope needs at least 5 batches' weight: fewer noisy points would set it from one or two batches.
    MIN_FIT = 5.0
    # Sizes must spread by a standard deviation of at least B/8 for a slope: below that (batches of 3 +- 2
    # at a light load) the timing noise of a shared core (a few ms) swamps the slope (~0.1 ms per image).
    SPREAD = 1 / 8
    # A batch that took more than 3x the model's time is a stall: a context switch or a blocked write on a
    # shared core (4-10 ms, up to ~100 ms seen) is longer than a batch (0.1-3 ms). Folded in whole, one
    # such batch halved the HA estimate at a 30 % load (16.7k to 7.6k/s); clipped to 3x, a
    # 70 ms one still cut it by 10 % (24.7k to 22.0k/s at 23k/s arriving) and sent auto to HT at a load HA
    # sustained. So a lone stall is left out, and only the 3rd in a row (a real slowdown) and those after
    # it are folded in, clipped to 3x: a 10x slowdown is followed within 10-60 batches (in the tests).
    STALL = 3.0
    STALL_RUN = 3

    def __init__(self, batch_size: int, overhead_s: float, per_image_s: float, alpha: float = ALPHA):
        if batch_size < 1 or overhead_s < 0 or per_image_s <= 0:
            raise ValueError(f"need batch_size >= 1, overhead >= 0, per_image > 0; not {batch_size}, "
                             f"{overhead_s}, {per_image_s}")
        self.batch_size, self.overhead_s, self.per_image_s, self.alpha = batch_size, overhead_s, per_image_s, alpha
        self._sums = [0.0] * 5  # weighted sums of 1, n, n^2, t, n*t over the answered batches
        self.samples = 0  # answered batches folded in
        self._stalls = 0  # stalls in a row (batches over STALL x the model's time)

    @classmethod
    def from_timings(cls, batch_size: int, full_s: float, part_n: int, part_s: float) -> "Capacity":
        """From two timed sizes: ``full_s`` for a full batch and ``part_s`` for ``part_n`` images (the line
        through both; a slope the noise made <= 0 falls back to no overhead)."""
        slope = (full_s - part_s) / (batch_size - part_n) if batch_size > part_n else 0.0
        if slope <= 0 or full_s - slope * batch_size < 0:
            return cls(batch_size, 0.0, full_s / batch_size)
        return cls(batch_size, full_s - slope * batch_size, slope)

    @classmethod
    def from_rate(cls, batch_size: int, images_per_s: float) -> "Capacity":
        """From a bare rate (no overhead known): ``per_image`` = 1 / rate."""
        return cls(batch_size, 0.0, 1.0 / images_per_s)

    def seconds(self, images: int) -> float:
        """The model's time for a batch of ``images``."""
        return self.overhead_s + self.per_image_s * images

    @property
    def value(self) -> float:
        """Images/s at full batches: ``B / t(B)``."""
        return self.batch_size / self.seconds(self.batch_size)

    def _add(self, n: float, t: float, weight: float) -> None:
        for i, v in enumerate((1.0, n, n * n, t, n * t)):
            self._sums[i] += weight * v

    def update(self, images: int, seconds: float) -> float:
        """Fold in one answered batch of ``images`` whose service took ``seconds`` (ignored when either is
        <= 0); returns the new :attr:`value`."""
        if images <= 0 or seconds <= 0:
            return self.value
        limit = self.STALL * self.seconds(min(images, self.batch_size))
        self._stalls = self._stalls + 1 if seconds > limit else 0
        if 0 < self._stalls < self.STALL_RUN:
            return self.value
        seconds = min(seconds, limit)
        self._sums = [(1 - self.alpha) * v for v in self._sums]
        self._add(min(images, self.batch_size), seconds, 1.0)
        self.samples += 1
        w, sn, snn, st, snt = self._sums
        n_mean, t_mean = sn / w, st / w
        var = snn / w - n_mean ** 2
        if w >= self.MIN_FIT and var >= (self.SPREAD * self.batch_size) ** 2:
            slope = (snt / w - n_mean * t_mean) / var
            if slope > 0 and t_mean - slope * n_mean >= 0:
                self.per_image_s, self.overhead_s = slope, t_mean - slope * n_mean
                return self.value
        if t_mean - self.per_image_s * n_mean < 0:  # faster than the slope allows: no overhead at all
            self.per_image_s = t_mean / n_mean
        self.overhead_s = t_mean - self.per_image_s * n_mean
        return self.value


class ServiceClock:
    """Busy seconds of each answered HA batch at HA's busiest stage, the coordinator.

    In HA the coordinator does everything a worker does (its group's features) plus the head and the
    recording of every batch, so on equal devices it is the stage that bounds HA's throughput. Its time per
    batch is measured without the waits: from when the batch was sent, or when the batch before it was
    answered if that was later (back to back, each one's service starts when the previous one is done), to
    its answer, less the time the coordinator spent waiting meanwhile (the caller adds each wait with
    :meth:`waited`). A latency (the wait for the workers' features included) read HA at 7.6-16.7k images/s
    at light loads where a saturated HA served 21.6k (docs/adaptive.md): a batch alone waits for
    the workers' transfer, which back-to-back batches overlap. When inputs are waiting (HA saturated), the
    waits count too (:meth:`answered`): they are then for the workers, and a worker slower than the
    coordinator shows.
    """

    def __init__(self) -> None:
        self.idle_s = 0.0  # seconds waited so far
        self.last_done = (float("-inf"), 0.0)  # (time, idle_s) at the last answer

    def waited(self, seconds: float) -> None:
        """The coordinator waited ``seconds`` (polled and found nothing, slept, waited for arrivals)."""
        self.idle_s += seconds

    def stamp(self, now: float) -> tuple[float, float]:
        """A batch sent ``now``: keep this with it and pass it to :meth:`answered`."""
        return now, self.idle_s

    def restart(self, now: float) -> None:
        """Forget the previous answer (after a recovery, whose time is nobody's batch)."""
        self.last_done = (now, self.idle_s)

    def answered(self, sent: tuple[float, float], now: float, saturated: bool = False) -> float:
        """Busy seconds of the batch stamped ``sent`` and answered ``now``. ``saturated``: inputs were
        waiting for HA meanwhile, so every wait was for the pipeline (the workers' features), not for
        arrivals, and counts: a worker slower than the coordinator then shows. With the waits always left
        out, the estimate ran up to 18 % above what a saturated HA served."""
        start = max(sent, self.last_done)  # the later of the two (tuples compare by time first)
        self.last_done = (now, self.idle_s)
        if saturated:
            return now - start[0]
        return max(0.0, (now - start[0]) - (self.idle_s - start[1]))
