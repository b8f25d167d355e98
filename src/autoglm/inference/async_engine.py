"""`AsyncEngine`: the engine core on its own thread, the output processor on the event loop.

The split is vLLM v1's: the core thread does nothing but run commands (add, abort, finish,
load an adapter) between steps and step while there is work; after each step it hands the
step's `EngineCoreOutput`s to the event loop in one call. There the output processor
detokenises them, checks stop strings and delivers each submission's outputs to its
`RequestStream` (one wake-up per stream per step, however many choices it has). Only the
core thread ever touches the core, so there is no engine lock, and the text work never
holds up a step.

A submission's requests are checked once, by the core's `add_request`: `submit` raises
its `InvalidRequestError` (a ValueError naming the input at fault). A stop string found
on the loop, a client that goes away (`RequestStream.close`) and `abort` each queue a
command, so the core frees the request's KV blocks before its next step and the loop
never waits for a step. An exception in the model runner fails the requests of that step
(their streams raise it, their other choices are cancelled) and the others go on; an
exception anywhere else in a step fails every request in flight. Either way the core keeps
serving new requests.

What the server may read or change goes through this class's public API: `tokenizer`,
`max_model_len`, `lora_adapters()`, `stats()`, `add_lora`, `remove_lora`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from .engine import LLMEngine
from .engine_core import StepError
from .output_processor import OutputProcessor
from .request import FinishReason, RequestOutput, SamplingParams

__all__ = ["AsyncEngine", "RequestStream"]

logger = logging.getLogger(__name__)


def _submission(request_id: str) -> str:
    """The submission a request id belongs to (`submit` names its requests `<submission>-<i>`)."""
    return request_id.rpartition("-")[0]


class RequestStream:
    """The outputs of one submission (its n choices), batched as they arrive: iterate with
    `async for batch in stream`, each batch a list of (choice index, RequestOutput). `close()`
    cancels the choices not finished yet (their KV blocks go back to the pool)."""

    def __init__(self, engine: "AsyncEngine", request_ids: list[str]) -> None:
        self.request_ids = request_ids
        self._engine = engine
        self._open = set(request_ids)
        self._items: list[tuple[int, RequestOutput]] = []
        self._error: BaseException | None = None
        self._ready = asyncio.Event()

    def _put(self, items: list[tuple[int, RequestOutput]] | BaseException) -> None:
        if isinstance(items, BaseException):
            self._error = items
        else:
            self._items += items
        self._ready.set()

    async def __aiter__(self) -> AsyncIterator[list[tuple[int, RequestOutput]]]:
        while self._open:
            await self._ready.wait()
            self._ready.clear()
            if self._error is not None:
                raise self._error
            batch, self._items = self._items, []
            for _, o in batch:
                if o.finished:
                    self._open.discard(o.request_id)
            if batch:
                yield batch

    @property
    def num_unfinished(self) -> int:
        return len(self._open)

    def close(self) -> None:
        """Cancel the unfinished choices (no-op when all finished)."""
        if self._open:
            self._engine.abort(sorted(self._open))
            self._open.clear()


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self._core = engine.core
        self._tokenizer = engine.tokenizer
        self._processor = OutputProcessor(engine.tokenizer)  # used on the event loop only
        self._streams: dict[str, tuple[RequestStream, int]] = {}  # request id -> its stream and choice index
        self._cv = threading.Condition()  # guards _commands and _stop
        self._commands: deque[Callable[[], None]] = deque()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---------------------------------------------------------------- read API
    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def max_model_len(self) -> int:
        return self._core.max_model_len

    def lora_adapters(self) -> dict[str, Path]:
        """Loaded LoRA adapters: served name -> directory."""
        return {name: a.path for name, a in self._core.lora.adapters.copy().items()}

    def stats(self) -> dict[str, int]:
        """Waiting and running requests, KV blocks used and in the pool (plain counters read
        without stopping the core: each is exact, together they may be a step apart)."""
        return self._core.snapshot()

    # --------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Start the core thread; call from the event loop that will submit requests."""
        if self._thread is None:
            self._loop = asyncio.get_running_loop()
            self._stop = False
            self._thread = threading.Thread(target=self._run, name="autoglm-engine-core", daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    # ---------------------------------------------------------------- requests
    async def submit(self, prompt_ids: list[int] | list[list[int]], params: SamplingParams | list[SamplingParams],
                     lora: str | None = None) -> RequestStream:
        """Queue one request per SamplingParams (the choices of one API call) on the LoRA adapter
        `lora` (None = base); `prompt_ids` a list of prompts (token-id lists) queues them for
        each prompt, prompt by prompt (stream index = prompt * len(params) + choice). Raises
        InvalidRequestError (a ValueError) for a bad request; then none of them was queued."""
        plist = params if isinstance(params, list) else [params]
        prompts = prompt_ids if prompt_ids and isinstance(prompt_ids[0], list) else [prompt_ids]
        work = [(ids, p) for ids in prompts for p in plist]
        base = uuid.uuid4().hex
        ids = [f"{base}-{i}" for i in range(len(work))]  # _submission(id) == base
        stream = RequestStream(self, ids)
        for i, (rid, (prompt, p)) in enumerate(zip(ids, work)):  # tracked before the core can report on them
            self._processor.add_request(rid, p, len(prompt))
            self._streams[rid] = (stream, i)

        def add() -> None:
            added = []
            try:
                for rid, (prompt, p) in zip(ids, work):
                    added.append(self._core.add_request(prompt, p, rid, lora).request_id)
            except BaseException:
                for rid in added:
                    self._core.abort(rid)
                raise
        try:
            await self._call(add)
        except BaseException:
            self._forget(ids)
            self._send(lambda: [self._core.abort(rid) for rid in ids])  # cancelled while queued: undo the add
            raise
        return stream

    def abort(self, request_ids: list[str]) -> None:
        """Cancel requests (their blocks are freed before the core's next step); returns at once."""
        self._forget(request_ids)
        self._send(lambda: [self._core.abort(rid) for rid in request_ids])

    async def add_lora(self, name: str, path) -> None:
        """Load a LoRA adapter while serving (between steps)."""
        await self._call(lambda: self._core.add_lora(name, path))

    async def remove_lora(self, name: str) -> None:
        """Unload a LoRA adapter while serving (refused while requests use it)."""
        await self._call(lambda: self._core.remove_lora(name))

    # --------------------------------------------------------------- internals
    def _forget(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self._processor.abort(rid)
            self._streams.pop(rid, None)

    def _send(self, fn: Callable[[], Any]) -> None:
        """Run `fn` on the core thread before its next step."""
        with self._cv:
            self._commands.append(fn)
            self._cv.notify()

    async def _call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the core thread before its next step; its result or exception comes back here."""
        if self._loop is None:
            raise RuntimeError("the engine is not started; call AsyncEngine.start() on the event loop first")
        fut = self._loop.create_future()

        def settle(value: Any, error: BaseException | None) -> None:
            if not fut.done():
                fut.set_exception(error) if error is not None else fut.set_result(value)

        def run() -> None:
            try:
                value, error = fn(), None
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                value, error = None, e
            self._loop.call_soon_threadsafe(settle, value, error)
        self._send(run)
        return await fut

    def _run(self) -> None:
        """The core thread: commands, then a step, while there is work."""
        core = self._core
        while True:
            with self._cv:
                while not self._stop and not self._commands and not core.has_unfinished():
                    self._cv.wait()
                if self._stop:
                    return
                commands, self._commands = list(self._commands), deque()
            for command in commands:
                command()
            if not core.has_unfinished():
                continue
            try:
                outs = core.step()
            except StepError as exc:  # the model failed on these requests: fail their submissions, the rest go on
                cause = exc.__cause__ or exc
                failed = {_submission(rid) for rid in exc.request_ids}
                ids = [rid for rid in core.requests if _submission(rid) in failed]  # with their other choices
                logger.error("engine step failed in the model runner (%s: %s); failing the %d request(s) of its "
                             "submissions, %d other(s) go on", type(cause).__name__, cause, len(ids),
                             len(core.requests) - len(ids), exc_info=cause)
                for rid in ids:
                    core.abort(rid)
                self._loop.call_soon_threadsafe(self._fail, ids, cause)
                continue
            except Exception as exc:  # noqa: BLE001 - request state unknown: fail all in flight, keep serving
                logger.exception("engine step failed; failing the requests in flight")
                ids = list(core.requests)
                for rid in ids:
                    core.abort(rid)
                self._loop.call_soon_threadsafe(self._fail, ids, exc)
                continue
            if outs:
                self._loop.call_soon_threadsafe(self._deliver, outs)

    def _deliver(self, core_outputs) -> None:
        """On the event loop: text, stop strings, then each stream's batch of this step."""
        try:
            res = self._processor.process(core_outputs)
        except Exception as exc:  # noqa: BLE001 - e.g. a tokenizer that cannot decode: fail these requests
            logger.exception("processing the engine's outputs failed; failing those requests")
            ids = [o.request_id for o in core_outputs]
            streams = {self._streams[rid][0] for rid in ids if rid in self._streams}
            self.abort(ids)
            for stream in streams:
                stream._put(exc)
            return
        if res.stops:
            hits = res.stops
            self._send(lambda: [self._core.finish(h.request_id, FinishReason.STOP, h.stop, h.num_output_tokens)
                                for h in hits])
        batches: dict[RequestStream, list[tuple[int, RequestOutput]]] = {}
        for o in res.outputs:
            entry = self._streams.pop(o.request_id, None) if o.finished else self._streams.get(o.request_id)
            if entry is not None:
                batches.setdefault(entry[0], []).append((entry[1], o))
        for stream, items in batches.items():
            stream._put(items)

    def _fail(self, request_ids: list[str], exc: BaseException) -> None:
        for rid in request_ids:
            entry = self._streams.pop(rid, None)
            self._processor.abort(rid)
            if entry is not None:
                entry[0]._put(exc)
