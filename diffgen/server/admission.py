"""Who may wait for the model: the bounded queue (the order is the batcher's, first come, first served).

A request takes its place in the queue (:meth:`Admission.admit`) before anything of it runs in
a thread; the place is given back once (:meth:`Reservation.release`) when its generation starts,
or when it is refused. When ``max_queue`` requests wait, a new one gets 429 with ``Retry-After``
(the running mean of request time).
"""

from __future__ import annotations

import math
import threading

from diffgen.server.wire import queue_full


class Admission:
    """The queue of requests waiting to start. Attributes: ``max_queue`` requests that may wait;
    ``queued`` waiting now; ``rejected`` 429s so far."""

    def __init__(self, max_queue: int):
        self.max_queue = max_queue
        self.queued = 0
        self.rejected = 0
        self._lock = threading.Lock()
        self._mean_seconds = 1.0

    def admit(self) -> Reservation:
        """A place in the queue, or a 429 :class:`~diffgen.server.wire.ApiError` when it is full."""
        with self._lock:
            if self.queued >= self.max_queue:
                self.rejected += 1
                raise queue_full(self.queued, max(1, math.ceil(self._mean_seconds)))
            self.queued += 1
        return Reservation(self)

    def leave(self) -> None:
        """One waiting request started (or was refused): see :meth:`Reservation.release`."""
        with self._lock:
            self.queued -= 1

    def finished(self, seconds: float) -> None:
        """Keep a running mean of request time (for ``Retry-After``)."""
        self._mean_seconds = 0.8 * self._mean_seconds + 0.2 * seconds


class Reservation:
    """A request's place in the queue, given back once (:meth:`release`) when its generation starts."""

    def __init__(self, admission: Admission):
        self._admission = admission
        self._released = False
        self._once = threading.Lock()

    def release(self) -> None:
        with self._once:
            if self._released:
                return
            self._released = True
        self._admission.leave()
