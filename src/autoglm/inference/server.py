"""OpenAI-compatible HTTP server (FastAPI): completions, chat completions, models, health, metrics.

    app = create_app(AsyncEngine(LLMEngine(model, tok, cfg)), model_name="autoglm", api_key=None)
    uvicorn.run(app, host="127.0.0.1", port=8000)

Every bad request gets a 4xx with an OpenAI-style body
`{"error": {"message", "type", "param", "code"}}` and the server keeps serving: malformed
JSON or invalid UTF-8 (400), schema errors and unsupported fields (400), unknown model
(404), bad or missing API key (401), prompt + max_tokens beyond the context (400), more
than `max_concurrent` requests in flight (429). A streaming client that disconnects
cancels its request, so its KV blocks go back to the pool.

LoRA adapters loaded on the engine (`engine.add_lora(name, path)`) are served as models of
their own: a request's `model` names the base model or an adapter, `/v1/models` lists both
(adapters with `parent` = the base), and requests on different adapters share each step.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import ValidationError

from .async_engine import AsyncEngine
from .protocol import UNSUPPORTED, ChatCompletionRequest, CompletionRequest, LoadLoRARequest, UnloadLoRARequest
from .request import MAX_LOGPROBS, RequestOutput, SamplingParams

__all__ = ["create_app", "ServerMetrics", "APIError", "chat_prompt", "BackgroundServer"]

logger = logging.getLogger(__name__)
_LAT = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


class ServerMetrics:
    """Prometheus metrics in the app's own registry (no global state)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("autoglm_requests", "Requests by outcome", ["outcome"], registry=r)
        self.prompt_tokens = Counter("autoglm_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("autoglm_generation_tokens", "Tokens generated", registry=r)
        self.waiting = Gauge("autoglm_num_requests_waiting", "Requests queued", registry=r)
        self.running = Gauge("autoglm_num_requests_running", "Requests running", registry=r)
        self.kv_used = Gauge("autoglm_kv_blocks_in_use", "KV blocks held by requests", registry=r)
        self.kv_total = Gauge("autoglm_kv_blocks_total", "KV blocks in the pool", registry=r)
        self.ttft = Histogram("autoglm_time_to_first_token_seconds", "Time to first token", buckets=_LAT, registry=r)
        self.tpot = Histogram("autoglm_time_per_output_token_seconds", "Time between output tokens",
                              buckets=_LAT, registry=r)
        self.queue = Histogram("autoglm_request_queue_time_seconds", "Time waiting before first scheduled",
                               buckets=_LAT, registry=r)
        self.e2e = Histogram("autoglm_e2e_request_latency_seconds", "End-to-end latency", buckets=_LAT, registry=r)


def chat_prompt(messages) -> str:
    """A plain chat template: one "role: content" line per message, then "assistant:"."""
    return "".join(f"{m.role}: {m.content}\n" for m in messages) + "assistant:"


def _params(req, max_tokens: int | None, context: int, prompt_len: int) -> SamplingParams:
    for name, neutral in UNSUPPORTED.items():
        val = getattr(req, name)
        if val not in (neutral if isinstance(neutral, tuple) else (neutral,)):
            raise APIError(400, f"'{name}' is not supported by this server; remove it from the request", name,
                           "unsupported_parameter")
    rf = req.response_format
    if rf is not None and rf.get("type") != "text":
        raise APIError(400, f"response_format {rf.get('type')!r} is not supported (no constrained decoding); "
                            "use type 'text' or drop the field", "response_format", "unsupported_parameter")
    logprobs = _logprobs_arg(req)
    room = context - prompt_len
    if max_tokens is None:
        max_tokens = min(16 if isinstance(req, CompletionRequest) else room, room)
    if max_tokens < 1:
        raise APIError(400, f"max_tokens must be >= 1, got {max_tokens}", "max_tokens")
    if max_tokens > room:
        raise APIError(400, f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds the model's context "
                            f"of {context} tokens; shorten the prompt or lower max_tokens", "max_tokens",
                       "context_length_exceeded")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    try:
        return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_k=req.top_k, top_p=req.top_p,
                              repetition_penalty=req.repetition_penalty, seed=req.seed, stop=stop,
                              ignore_eos=req.ignore_eos, logprobs=logprobs)
    except ValueError as e:
        raise APIError(400, str(e)) from None


def _logprobs_arg(req) -> int | None:
    """Number of top alternatives per token, or None when logprobs are not asked for.
    Completions: `logprobs: N`. Chat: `logprobs: true` with optional `top_logprobs: N`."""
    if isinstance(req, CompletionRequest):
        if req.top_logprobs is not None:
            raise APIError(400, "'top_logprobs' belongs to chat completions; for completions send 'logprobs': N",
                           "top_logprobs")
        if req.logprobs is None:
            return None
        if isinstance(req.logprobs, bool):
            raise APIError(400, "'logprobs' of a completion is an integer (top alternatives per token, 0-"
                                f"{MAX_LOGPROBS}), not a boolean", "logprobs")
        n = req.logprobs
    else:
        if req.logprobs is not None and not isinstance(req.logprobs, bool):
            raise APIError(400, "'logprobs' of a chat completion is a boolean; give the number of alternatives "
                                "in 'top_logprobs'", "logprobs")
        if not req.logprobs:
            if req.top_logprobs:
                raise APIError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
            return None
        n = req.top_logprobs or 0
    if not 0 <= n <= MAX_LOGPROBS:
        raise APIError(400, f"the number of top logprobs must be in [0, {MAX_LOGPROBS}], got {n}",
                       "logprobs" if isinstance(req, CompletionRequest) else "top_logprobs")
    return n


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has already been read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _LogprobWriter:
    """Per-choice logprobs in the OpenAI shapes: completions `{tokens, token_logprobs,
    top_logprobs, text_offset}`, chat `{content: [{token, logprob, bytes, top_logprobs}]}`."""

    def __init__(self, tok, chat: bool) -> None:
        self.tok, self.chat, self.offset = tok, chat, 0

    def text(self, token_id: int) -> str:
        return self.tok.decode([token_id])

    def payload(self, entries) -> dict | None:
        if entries is None:
            return None
        if self.chat:
            def item(tid, lp):
                t = self.text(tid)
                return {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))}
            return {"content": [{**item(e.token_id, e.logprob), "top_logprobs": [item(i, v) for i, v in e.top]}
                                for e in entries]}
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for e in entries:
            t = self.text(e.token_id)
            out["tokens"].append(t)
            out["token_logprobs"].append(e.logprob)
            tops = {}
            for i, v in e.top:
                tops.setdefault(self.text(i), v)  # two ids can decode to the same text: keep the likelier
            out["top_logprobs"].append(tops)
            out["text_offset"].append(self.offset)
            self.offset += len(t)
        return out

    @staticmethod
    def merge(a: dict | None, b: dict | None) -> dict | None:
        if a is None or b is None:
            return a or b
        return {k: a[k] + b[k] for k in a}


def create_app(engine: AsyncEngine, model_name: str = "autoglm", api_key: str | None = None,
               max_concurrent: int = 256, allow_lora_updates: bool = False) -> FastAPI:
    """Build the FastAPI app around a started-on-startup AsyncEngine.

    allow_lora_updates: enable POST /v1/load_lora_adapter {"lora_name", "lora_path"} and
    /v1/unload_lora_adapter {"lora_name"} (vLLM's routes): adapters come and go without a
    restart. Off by default, since it lets a client make the server read a local path."""
    metrics = ServerMetrics()
    loras = engine.engine.lora
    if model_name in loras:
        raise ValueError(f"a LoRA adapter is named {model_name!r} like the base model; rename the adapter")
    tok = engine.engine.tokenizer
    context = engine.engine.max_len
    state = {"in_flight": 0}

    @asynccontextmanager
    async def lifespan(_app):
        engine.start()
        yield
        engine.shutdown()

    app = FastAPI(title="Open-AutoGLM", lifespan=lifespan)
    app.state.metrics, app.state.engine = metrics, engine

    @app.exception_handler(APIError)
    async def _api_error(_, exc: APIError):
        return exc.response()

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key is not None and request.url.path.startswith("/v1"):
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                return APIError(401, "missing or invalid API key; send 'Authorization: Bearer <key>'",
                                code="invalid_api_key", kind="authentication_error").response()
        return await call_next(request)

    async def parse(request: Request, schema):
        body = await request.body()
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise APIError(400, "request body is not valid UTF-8; encode the JSON as UTF-8") from None
        try:
            data = json.loads(text)
            # strings with lone surrogates (e.g. "\ud800") parse as JSON but are not text
            json.dumps(data, ensure_ascii=False).encode("utf-8")
        except json.JSONDecodeError as e:
            raise APIError(400, f"malformed JSON body: {e}") from None
        except UnicodeEncodeError:
            raise APIError(400, "request contains invalid Unicode (a lone surrogate); send valid UTF-8 text") from None
        try:
            req = schema.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(x) for x in err["loc"])
            raise APIError(400, f"invalid field '{loc}': {err['msg']} ({len(e.errors())} error(s))", loc) from None
        if schema in (LoadLoRARequest, UnloadLoRARequest):
            return req
        if req.model != model_name and req.model not in loras:
            served = ", ".join(repr(m) for m in [model_name, *loras.names()])
            raise APIError(404, f"model {req.model!r} does not exist; this server serves {served} "
                                f"(see /v1/models)", "model", "model_not_found")
        return req

    def encode(prompt) -> list[int]:
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return list(prompt)
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise APIError(400, "several prompts in one request are not supported; send one prompt (use n "
                                    "for several completions)", "prompt")
            prompt = prompt[0]
        ids = tok(prompt).input_ids
        if not ids:
            raise APIError(400, "prompt is empty", "prompt")
        return ids

    async def run(prompt_ids: list[int], params: SamplingParams, n: int, lora: str | None = None):
        """Submit n requests; yields (choice index, RequestOutput) as they stream in."""
        if state["in_flight"] + n > max_concurrent:
            metrics.requests.labels("rejected").inc()
            raise APIError(429, f"too many concurrent requests ({max_concurrent} in flight); retry later",
                           code="rate_limit_exceeded", kind="rate_limit_error")
        state["in_flight"] += n  # reserved before any await, so concurrent handlers see it
        subs = []
        try:
            for i in range(n):
                sp = params if params.seed is None or n == 1 else \
                    SamplingParams(**{**params.__dict__, "seed": params.seed + i})
                subs.append(await engine.submit(prompt_ids, sp, lora))
        except BaseException as e:
            for rid, _ in subs:
                engine.abort(rid)
            state["in_flight"] -= n
            if isinstance(e, ValueError):
                raise APIError(400, str(e)) from None
            raise
        metrics.prompt_tokens.inc(len(prompt_ids) * n)
        return subs

    async def stream(subs):
        t0 = time.perf_counter()
        merged: asyncio.Queue = asyncio.Queue()
        done = [False] * len(subs)

        async def pump(i, q):
            last = t0
            first = True
            while True:
                item = await q.get()
                if isinstance(item, Exception):
                    await merged.put((i, item))
                    return
                now = time.perf_counter()
                (metrics.ttft if first else metrics.tpot).observe(now - last)
                if item.queue_time is not None:
                    metrics.queue.observe(item.queue_time)
                first, last = False, now
                metrics.generation_tokens.inc(len(item.new_token_ids))
                await merged.put((i, item))
                if item.finished:
                    metrics.e2e.observe(now - t0)
                    return

        tasks = [asyncio.create_task(pump(i, q)) for i, (_, q) in enumerate(subs)]
        try:
            while not all(done):
                i, item = await merged.get()
                if isinstance(item, Exception):
                    raise APIError(500, f"engine error: {item}", kind="server_error")
                done[i] = item.finished
                yield i, item
            metrics.requests.labels("finished").inc(len(subs))
        finally:
            for (rid, _), t, d in zip(subs, tasks, done):
                t.cancel()
                if not d:  # client went away (or an error): free its blocks
                    engine.abort(rid)
                    metrics.requests.labels("aborted").inc()
            state["in_flight"] -= len(subs)

    def usage(n_prompt, outs):
        c = sum(o.num_output_tokens for o in outs)
        return {"prompt_tokens": n_prompt, "completion_tokens": c, "total_tokens": n_prompt + c}

    async def handle(request: Request, schema, chat: bool):
        req = await parse(request, schema)
        prompt_ids = encode(chat_prompt(req.messages) if chat else req.prompt)
        if len(prompt_ids) >= context:
            raise APIError(400, f"prompt has {len(prompt_ids)} tokens but the model's context is {context}; "
                                f"shorten the prompt", "prompt" if not chat else "messages", "context_length_exceeded")
        max_tokens = (req.max_completion_tokens or req.max_tokens) if chat else req.max_tokens
        params = _params(req, max_tokens, context, len(prompt_ids))
        lora = None if req.model == model_name else req.model
        subs = await run(prompt_ids, params, req.n, lora)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(sse(subs, rid, created, obj, chat, include_usage, len(prompt_ids), req.model),
                                     media_type="text/event-stream")
        texts, finals = [""] * req.n, [None] * req.n
        writers = [_LogprobWriter(tok, chat) for _ in range(req.n)]
        lps = [None] * req.n

        async def collect():
            async for i, o in stream(subs):
                texts[i] += o.new_text
                lps[i] = _LogprobWriter.merge(lps[i], writers[i].payload(o.logprobs))
                if o.finished:
                    finals[i] = o

        # a client that hangs up before the answer is ready cancels its requests (their KV
        # blocks go back to the pool) instead of generating for nobody
        work, gone = asyncio.create_task(collect()), asyncio.create_task(_disconnected(request))
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
            return Response(status_code=499)
        gone.cancel()
        work.result()
        choices = []
        for i, (t, o) in enumerate(zip(texts, finals)):
            c = {"index": i, "finish_reason": o.finish_reason.value, "stop_reason": o.stop_reason, "logprobs": lps[i]}
            c.update({"message": {"role": "assistant", "content": t}} if chat else {"text": t})
            choices.append(c)
        return {"id": rid, "object": obj, "created": created, "model": req.model, "choices": choices,
                "usage": usage(len(prompt_ids) * req.n, finals)}

    async def sse(subs, rid, created, obj, chat, include_usage, n_prompt, model):
        obj += ".chunk" if chat else ""
        base = {"id": rid, "object": obj, "created": created, "model": model}

        def chunk(choices, **extra):
            return f"data: {json.dumps({**base, 'choices': choices, **extra})}\n\n"

        finals = []
        writers = [_LogprobWriter(tok, chat) for _ in subs]
        try:
            if chat:
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                             for i in range(len(subs))])
            async for i, o in stream(subs):
                fr = o.finish_reason.value if o.finished else None
                c = {"index": i, "finish_reason": fr, "logprobs": writers[i].payload(o.logprobs)}
                if o.finished:
                    c["stop_reason"] = o.stop_reason
                    finals.append(o)
                c.update({"delta": {"content": o.new_text}} if chat else {"text": o.new_text})
                yield chunk([c])
            if include_usage:
                yield chunk([], usage=usage(n_prompt * len(subs), finals))
            yield "data: [DONE]\n\n"
        except APIError as e:
            yield f"data: {json.dumps({'error': {'message': e.message, 'type': e.kind}})}\n\n"

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, CompletionRequest, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, ChatCompletionRequest, chat=True)

    def lora_updates_allowed():
        if not allow_lora_updates:
            raise APIError(403, "loading and unloading LoRA adapters at run time is off; start the server with "
                                "--allow-lora-updates", code="lora_updates_disabled", kind="permission_error")

    @app.post("/v1/load_lora_adapter")
    async def load_lora(request: Request):
        lora_updates_allowed()
        req = await parse(request, LoadLoRARequest)
        if req.lora_name == model_name:
            raise APIError(400, f"{req.lora_name!r} is the base model's name; pick another adapter name", "lora_name")
        try:
            await asyncio.to_thread(engine.add_lora, req.lora_name, req.lora_path)
        except FileNotFoundError as e:
            raise APIError(404, str(e), "lora_path", "lora_not_found") from None
        except ValueError as e:
            raise APIError(400, str(e), "lora_path") from None
        return PlainTextResponse(f"LoRA adapter {req.lora_name!r} loaded")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora(request: Request):
        lora_updates_allowed()
        req = await parse(request, UnloadLoRARequest)
        if req.lora_name not in loras:
            raise APIError(404, f"no LoRA adapter named {req.lora_name!r} is loaded; loaded: "
                                f"{loras.names() or 'none'}", "lora_name", "lora_not_found")
        try:
            await asyncio.to_thread(engine.remove_lora, req.lora_name)
        except ValueError as e:
            raise APIError(409, str(e), "lora_name", "lora_in_use") from None
        return PlainTextResponse(f"LoRA adapter {req.lora_name!r} unloaded")

    @app.get("/v1/models")
    async def models():
        card = {"object": "model", "created": 0, "owned_by": "autoglm", "max_model_len": context}
        data = [{"id": model_name, **card, "root": model_name, "parent": None}]
        data += [{"id": a.name, **card, "root": str(a.path), "parent": model_name} for a in loras.adapters.values()]
        return {"object": "list", "data": data}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def prom():
        s = await engine.snapshot_async()
        metrics.waiting.set(s["waiting"])
        metrics.running.set(s["running"])
        metrics.kv_used.set(s["kv_blocks_used"])
        metrics.kv_total.set(s["kv_blocks_total"])
        return PlainTextResponse(generate_latest(metrics.registry).decode(), media_type="text/plain; version=0.0.4")

    return app


class BackgroundServer:
    """Run an app with uvicorn on a free 127.0.0.1 port in a daemon thread (tests, benchmarks).

    Use as a context manager: `with BackgroundServer(app) as url: ...` gives "http://127.0.0.1:PORT".
    """

    def __init__(self, app, timeout: float = 10.0) -> None:
        import socket
        import threading

        import uvicorn

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._timeout = timeout

    def __enter__(self) -> str:
        self._thread.start()
        deadline = time.monotonic() + self._timeout
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"server on port {self.port} did not start within {self._timeout} s")
            time.sleep(0.05)
        return self.url

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=self._timeout)
