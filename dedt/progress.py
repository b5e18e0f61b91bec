"""Progress of long loops (training, the DRO proxy, sampling, encoding), for terminals and dashboards.

A library loop takes an optional ``on_progress(done, total, info)`` callback and calls it through a
``Throttle``: at most once every ``REPORT_EVERY_S`` seconds, and once at the end. ``done`` and
``total`` count images; ``info`` holds ``images_per_s`` (since the loop started), ``eta_s`` and
whatever the loop adds (``loss``). The check per step is one clock read, so the step loop does not
slow down.

The pipeline's stages take their callback from ``current()``, which ``reporting(fn)`` sets for the
stage being run (the Prefect tasks set one that updates a progress artifact); dedt itself never
imports Prefect.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

ProgressFn = Callable[[int, int, dict[str, Any]], None]

# Our choice: a few updates a minute, as often as a person glances at a dashboard; one update costs
# a Prefect API call (~10 ms), so 10 s keeps its cost under 0.1% of the loop.
REPORT_EVERY_S = 10.0

_CURRENT: contextvars.ContextVar[ProgressFn | None] = contextvars.ContextVar("dedt_progress", default=None)


class Throttle:
    """Calls ``on_progress`` at most every ``every_s`` seconds and when ``done`` reaches ``total``.

    ``initial`` images were done before this session (a resumed run): the rate counts only the
    images of this session. ``info`` may be a callable, evaluated only when a report is due (a loss
    that needs a device sync, for example).
    """

    def __init__(
        self, on_progress: ProgressFn | None, total: int, *, initial: int = 0, every_s: float | None = None
    ) -> None:
        self.on_progress, self.total, self.initial = on_progress, int(total), int(initial)
        self.every_s = REPORT_EVERY_S if every_s is None else every_s
        self.start = self.last = time.perf_counter()

    def __call__(self, done: int, info: dict[str, Any] | Callable[[], dict[str, Any]] | None = None) -> None:
        if self.on_progress is None:
            return
        now = time.perf_counter()
        if now - self.last < self.every_s and done < self.total:
            return
        self.last = now
        rate = (done - self.initial) / max(now - self.start, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else math.inf
        extra = info() if callable(info) else (info or {})
        self.on_progress(int(done), self.total, {"images_per_s": rate, "eta_s": max(eta, 0.0), **extra})


def format_line(name: str, done: int, total: int, info: dict[str, Any]) -> str:
    """One terminal line: 'train:reference 12.3k/57.6k img (21%), 850 img/s, loss 0.0412, ETA 53 s'."""
    parts = [
        f"{name} {_count(done)}/{_count(total)} img ({100 * done / max(total, 1):.0f}%)",
        f"{info.get('images_per_s', float('nan')):.0f} img/s",
    ]
    if info.get("loss") is not None and math.isfinite(info["loss"]):
        parts.append(f"loss {info['loss']:.4f}")
    eta = info.get("eta_s", math.inf)
    parts.append(f"ETA {_duration(eta)}" if math.isfinite(eta) else "ETA ?")
    return ", ".join(parts)


def current() -> ProgressFn | None:
    """The callback ``reporting`` set for this stage, or None (no progress reported)."""
    return _CURRENT.get()


@contextlib.contextmanager
def reporting(on_progress: ProgressFn | None) -> Iterator[None]:
    """Within: ``current()`` returns ``on_progress``."""
    token = _CURRENT.set(on_progress)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
