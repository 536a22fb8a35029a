"""A scheduler running in a thread of its own, for a server.

    loop = EngineLoop(engine.scheduler(limits))
    handle = loop.submit(request, on_update=..., on_done=...)    # from any thread
    loop.cancel(handle)
    loop.call(lambda: engine.inspect(text, "l2")).result()      # other model work, between steps

The thread steps while there is work and sleeps otherwise. The model's hooks are per
model, so nothing else may run a forward while a step does: work such as ``inspect`` or
loading a dictionary is handed to the loop with :meth:`call` and runs between two steps.
``heartbeat`` is the last time the thread was between steps; a health check reads it
instead of waiting for a lock.

If a step raises (a bug, or memory), every request in the batch and in the queue fails with
that error and the loop goes on with an empty batch: the server keeps serving.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future

logger = logging.getLogger(__name__)


class EngineLoop:
    def __init__(self, scheduler, name: str = "steerserve-engine"):
        self.scheduler = scheduler
        self.heartbeat = time.monotonic()
        self.steps = 0
        self._calls: deque[tuple] = deque()
        self._wake = threading.Event()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, request, **callbacks):
        handle = self.scheduler.submit(request, **callbacks)
        self._wake.set()
        return handle

    def cancel(self, handle) -> None:
        self.scheduler.cancel(handle)
        self._wake.set()

    def call(self, fn) -> Future:
        """Run ``fn()`` in the loop's thread between two steps; its result or error in the future."""
        future: Future = Future()
        self._calls.append((fn, future))
        self._wake.set()
        return future

    def alive(self, within: float) -> bool:
        """The thread runs and was between steps in the last ``within`` seconds."""
        return self._thread.is_alive() and time.monotonic() - self.heartbeat < within

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stopped:
            self.heartbeat = time.monotonic()
            while self._calls:
                fn, future = self._calls.popleft()
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except BaseException as err:  # noqa: BLE001 - handed to the caller
                        future.set_exception(err)
            if self.scheduler.has_work():
                try:
                    self.scheduler.step()
                    self.steps += 1
                except Exception as err:  # noqa: BLE001 - fail what was running, keep serving
                    logger.exception("a scheduler step failed; failing the requests it held")
                    self.scheduler.fail_all(err)
                continue
            self._wake.wait(timeout=1.0)
            self._wake.clear()
