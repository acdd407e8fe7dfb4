"""What a live view of one training loop shows: step / total, s/it, ETA, the loss (raw and smoothed) and a short
loss history, plus when the next message to the view is due.

Pure bookkeeping over the trainer's `StepInfo` events: no clock of its own (the caller passes `now`), no I/O, so a UI
adapter only decides where the snapshot goes. Snapshots are JSON-ready numbers, never paths.
"""
from __future__ import annotations

import math
from collections import deque

from .trainer import StepInfo

SPEED_WINDOW = 20  # s/it is the mean of the last 20 steps: it follows a slowdown but shrugs off one slow step
LOSS_SMOOTHING = 0.9  # exponential smoothing of the loss, about the last 10 steps
MAX_POINTS = 200  # history points kept: enough for a node-sized chart, small enough to resend every message
MIN_INTERVAL_S = 0.2  # at most ~5 messages a second: a fast run must not flood the browser's socket


class ProgressTracker:
    """Progress of one loop of `total` steps that starts at run step `first_step`.

    The loss history is bounded: each point is the mean loss of `stride` consecutive steps, and when `max_points`
    points are full, neighbours merge pairwise and the stride doubles, so the history always spans the whole loop.
    """

    def __init__(self, total: int, first_step: int = 0, *, min_interval_s: float = MIN_INTERVAL_S,
                 max_points: int = MAX_POINTS):
        if total < 1:
            raise ValueError(f"steps: {total}; a loop has 1 step or more")
        if max_points < 2 or max_points % 2:
            raise ValueError(f"max_points: {max_points}; use an even number, 2 or more (points merge in pairs)")
        self.total = total
        self.first_step = first_step
        self.min_interval_s = min_interval_s
        self.max_points = max_points
        self.step = first_step  # optimizer steps done in the whole run
        self.loss = math.nan
        self.smoothed_loss = math.nan
        self.stopped = False
        self._ema = 0.0
        self._ema_steps = 0
        self._seconds: deque[float] = deque(maxlen=SPEED_WINDOW)
        self._points: list[tuple[int, float, float]] = []  # (last step, mean loss, smoothed loss at that step)
        self._stride = 1  # steps per point
        self._open: list[float] = []  # losses of the point being filled, fewer than `_stride`
        self._sent_at = -math.inf

    @property
    def done(self) -> int:
        """Steps of this loop done (a continued loop starts part way)."""
        return self.step - self.first_step

    @property
    def running(self) -> bool:
        return not self.stopped and self.done < self.total

    @property
    def seconds_per_step(self) -> float:
        """Mean wall time of the last SPEED_WINDOW steps; NaN before the first."""
        return sum(self._seconds) / len(self._seconds) if self._seconds else math.nan

    @property
    def eta_seconds(self) -> float:
        return self.seconds_per_step * (self.total - self.done)

    def update(self, info: StepInfo) -> None:
        """Take in one finished optimizer step."""
        self._seconds.append(info.seconds)
        self._record(info.step, info.loss)

    def replay(self, losses: list[float]) -> None:
        """Steps of this loop done before (a continued loop, or one loaded from the run store), oldest first:
        charted and counted, not timed."""
        for i, loss in enumerate(losses):
            self._record(self.first_step + i + 1, loss)

    def _record(self, step: int, loss: float) -> None:
        self.step, self.loss = step, loss
        # bias-corrected like Adam's moments, so the first steps are not pulled toward 0
        self._ema = LOSS_SMOOTHING * self._ema + (1 - LOSS_SMOOTHING) * loss
        self._ema_steps += 1
        self.smoothed_loss = self._ema / (1 - LOSS_SMOOTHING**self._ema_steps)
        self._open.append(loss)
        if len(self._open) == self._stride:
            self._points.append((step, sum(self._open) / self._stride, self.smoothed_loss))
            self._open = []
            if len(self._points) == self.max_points:
                pairs = zip(self._points[::2], self._points[1::2])
                self._points = [(b[0], (a[1] + b[1]) / 2, b[2]) for a, b in pairs]
                self._stride *= 2

    def stop(self) -> None:
        """The loop ended early (Cancel, an error): the view stops counting down."""
        self.stopped = True

    def due(self, now: float) -> bool:
        """Whether to send a message at time `now` (seconds, any monotonic clock): at most one per `min_interval_s`,
        but always the loop's last step. True marks it sent."""
        if self.running and now - self._sent_at < self.min_interval_s:
            return False
        self._sent_at = now
        return True

    def snapshot(self) -> dict:
        """The view's numbers as a fresh JSON-ready dict (None where unknown yet); `history` is
        [[run step, mean loss, smoothed loss], ...], oldest first, with the partly filled last point included."""
        points = list(self._points)
        if self._open:
            points.append((self.step, sum(self._open) / len(self._open), self.smoothed_loss))
        return {
            "step": self.done,
            "total": self.total,
            "run_step": self.step,
            "running": self.running,
            "s_per_it": _number(self.seconds_per_step),
            "eta_s": _number(self.eta_seconds),
            "loss": _number(self.loss),
            "smoothed_loss": _number(self.smoothed_loss),
            "history": [[step, loss, smoothed] for step, loss, smoothed in points],
        }


def _number(value: float) -> float | None:
    """JSON has no NaN: unknown values travel as null."""
    return value if math.isfinite(value) else None
