"""The thread that drives ``Engine.step`` and hands each event to its request's asyncio queue.

Why a thread: a step is numpy and onnxruntime work that releases the GIL for most of its time, so the
event loop keeps accepting, validating and streaming while the engine computes. The loop thread only
calls ``submit``/``cancel`` (thread-safe on the engine); the worker is the only caller of ``step``.
"""

from __future__ import annotations

import asyncio
import logging
import threading

from ..runtime.engine import Engine
from ..runtime.finish import FinishReason
from ..runtime.sequence import Sequence, TokenEvent

log = logging.getLogger("llava_edge.serve")


class EngineWorker:
    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop):
        self.engine = engine
        self.loop = loop
        self.queues: dict[str, asyncio.Queue] = {}
        self._stop = threading.Event()
        self.paused = False  # debug routes only: hold the engine still so tests can stage a state
        self._steps_allowed = 0
        self._cond = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="llava-edge-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        self.engine.wakeup.set()
        self._thread.join(timeout=10)

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        self.engine.wakeup.set()

    def allow_steps(self, n: int) -> None:
        """While paused: run exactly n more steps (debug routes)."""
        with self._cond:
            self._steps_allowed += n
        self.engine.wakeup.set()

    def _may_step(self) -> bool:
        if not self.paused:
            return True
        with self._cond:
            if self._steps_allowed > 0:
                self._steps_allowed -= 1
                return True
        return False

    def submit(self, seq: Sequence) -> asyncio.Queue:
        """Queue a sequence; its events arrive on the returned queue (loop thread only)."""
        q: asyncio.Queue = asyncio.Queue()
        self.queues[seq.seq_id] = q
        self.engine.add(seq)
        return q

    def cancel(self, seq_id: str) -> None:
        self.queues.pop(seq_id, None)
        self.engine.cancel(seq_id)

    def _run(self) -> None:
        engine = self.engine
        while not self._stop.is_set():
            engine.wakeup.clear()
            if not engine.has_work() or not self._may_step():
                engine.wakeup.wait(timeout=1.0)
                continue
            try:
                events = engine.step()
            except Exception:  # noqa: BLE001 - a bug in a step must not kill the server: fail what is live
                log.exception("engine step failed; failing the running requests")
                events = [TokenEvent(sid, None, "", FinishReason.ERROR) for sid in list(engine._live)]
                for sid in list(engine._live):
                    engine.cancel(sid)
            if events:
                self.loop.call_soon_threadsafe(self._deliver, events)

    def _deliver(self, events: list[TokenEvent]) -> None:
        for ev in events:
            q = self.queues.get(ev.seq_id)
            if q is not None:
                q.put_nowait(ev)
                if ev.finish_reason is not None:
                    self.queues.pop(ev.seq_id, None)
