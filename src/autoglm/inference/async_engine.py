"""`AsyncEngine`: the engine's step loop on a background thread, fed from an asyncio server.

The engine itself is synchronous and not thread-safe; every call into it happens under
one lock. The loop thread steps while there is work and sleeps on a condition variable
otherwise; each request's outputs are handed to its `asyncio.Queue` on the server's
event loop (`call_soon_threadsafe`). An exception inside a step fails every request in
flight (their queues receive the exception) and the loop keeps serving new requests.
"""

from __future__ import annotations

import asyncio
import logging
import threading

from .engine import LLMEngine
from .request import RequestOutput, SamplingParams

__all__ = ["AsyncEngine"]

logger = logging.getLogger(__name__)


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._cv = threading.Condition()
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stop = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="autoglm-engine", daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    # ------------------------------------------------------------- requests
    async def submit(self, prompt_ids: list[int], params: SamplingParams,
                     lora: str | None = None) -> tuple[str, asyncio.Queue]:
        """Queue a request (on the LoRA adapter `lora`, None = base); its outputs arrive on the returned
        queue. Raises ValueError for a bad request. Waits for the engine lock on a worker thread, so the
        event loop is not blocked by a step."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        rid = await asyncio.to_thread(self._submit, prompt_ids, params, lora, loop, q)
        return rid, q

    def _submit(self, prompt_ids, params, lora, loop, q) -> str:
        with self._cv:
            rid = self.engine.add_request(prompt_ids, params, lora=lora)
            self._queues[rid] = (loop, q)
            self._cv.notify_all()
        return rid

    def add_lora(self, name: str, path) -> None:
        """Load a LoRA adapter while serving (between steps)."""
        with self._cv:
            self.engine.add_lora(name, path)

    def remove_lora(self, name: str) -> None:
        """Unload a LoRA adapter while serving (refused while requests use it)."""
        with self._cv:
            self.engine.remove_lora(name)

    def abort(self, request_id: str) -> None:
        with self._cv:
            self.engine.abort(request_id)
            self._queues.pop(request_id, None)

    async def snapshot_async(self) -> dict[str, int]:
        return await asyncio.to_thread(self.snapshot)

    def snapshot(self) -> dict[str, int]:
        """Queue depth and KV usage for /metrics."""
        with self._cv:
            e = self.engine
            return {"waiting": e.num_waiting, "running": e.num_running, "kv_blocks_used": e.pool.num_used,
                    "kv_blocks_total": e.pool.num_blocks}

    # ----------------------------------------------------------------- loop
    def _deliver(self, rid: str, item: RequestOutput | Exception, last: bool) -> None:
        target = self._queues.pop(rid, None) if last else self._queues.get(rid)
        if target is not None:
            loop, q = target
            loop.call_soon_threadsafe(q.put_nowait, item)

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self.engine.has_unfinished():
                    self._cv.wait()
                if self._stop:
                    return
                try:
                    outs = self.engine.step()
                except Exception as exc:  # noqa: BLE001 - fail the batch, keep serving
                    logger.exception("engine step failed; failing the requests in flight")
                    for rid in list(self.engine.requests):
                        self.engine.abort(rid)
                        self._deliver(rid, exc, True)
                    continue
                for o in outs:
                    self._deliver(o.request_id, o, o.finished)
