"""OpenAI-compatible HTTP server (FastAPI): thin routes over `AsyncEngine`'s public API.

    app = create_app(AsyncEngine(LLMEngine(model, tok, cfg)), model_name="autoglm", api_key=None)
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes: POST /v1/completions, /v1/chat/completions (streamed as SSE or whole), GET
/v1/models, /health, /metrics, and with `allow_lora_updates` POST /v1/load_lora_adapter
and /v1/unload_lora_adapter. The OpenAI shapes (schemas in, responses and chunks out) are
`protocol`'s; a route parses, submits to the engine and streams what comes back.

Every bad request gets a 4xx with an OpenAI-style body `{"error": {"message", "type",
"param", "code"}}` and the server keeps serving: malformed JSON, invalid UTF-8 or nesting
too deep to parse (400), schema errors and unsupported fields (400), unknown model (404),
bad or missing API key (401), a request the engine refuses, e.g. prompt + max_tokens
beyond the context or a logit_bias token outside the vocabulary (400, with the engine's
`param` and `code`), a batch of more than `max_prompts` prompts (400), sampling values
float32 sampling cannot take (non-finite, a repetition penalty outside [0.01, 100], a seed
outside int64: 400, so no engine step fails on them), one request of more sequences
(prompts x n) than `max_concurrent` (400: waiting would not help), more than
`max_concurrent` sequences in flight (429). A client that disconnects cancels its
request, so its KV blocks go back to the pool.

Graceful shutdown (`serve_app`, what `autoglm serve` runs): on SIGTERM the server drains:
/health and every new generation request answer 503, requests in flight run to the end,
and the process exits once none is left (or after `drain_timeout` seconds); a second
signal exits at once. Kubernetes removes the pod from its Service when the readiness
probe sees the 503, so the terminationGracePeriodSeconds must cover the drain.

LoRA adapters loaded on the engine are served as models of their own: a request's `model`
names the base model or an adapter, `/v1/models` lists both (adapters with `parent` = the
base), and requests on different adapters share each step.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import ValidationError

from .async_engine import AsyncEngine, RequestStream
from .protocol import (APIError, ChatCompletionRequest, CompletionRequest, LoadLoRARequest, ResponseBuilder,
                       UnloadLoRARequest, chat_prompt, decode_image_url, echo_texts, encode_prompts,
                       sampling_params)
from .request import RequestOutput, SamplingParams

__all__ = ["create_app", "serve_app", "DrainingServer", "ServerMetrics", "APIError", "chat_prompt"]

log = logging.getLogger(__name__)

_LAT = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


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
        self.tpot = Histogram("autoglm_time_per_output_token_seconds", "Mean time between a request's output "
                              "tokens after the first (one observation per request)", buckets=_LAT, registry=r)
        self.queue = Histogram("autoglm_request_queue_time_seconds", "Time waiting before first scheduled",
                               buckets=_LAT, registry=r)
        self.e2e = Histogram("autoglm_e2e_request_latency_seconds", "End-to-end latency", buckets=_LAT, registry=r)
        self.kv_cached = Gauge("autoglm_kv_blocks_cached", "KV blocks holding a shareable prefix (held or free)",
                               registry=r)
        self.prefix_queries = Counter("autoglm_prefix_cache_queries", "Tokens of admitted requests looked up in the prefix cache",
                                      registry=r)
        self.prefix_hits = Counter("autoglm_prefix_cache_hits", "Tokens served from the prefix cache (not computed)",
                                   registry=r)
        self._prefix_seen = (0, 0)  # the engine's totals at the last scrape (the counters grow by the difference)

    def observe_prefix_cache(self, queried: int, hits: int) -> None:
        q0, h0 = self._prefix_seen
        self.prefix_queries.inc(max(queried - q0, 0))
        self.prefix_hits.inc(max(hits - h0, 0))
        self._prefix_seen = (queried, hits)


@dataclass
class _Server:
    """What the routes share (`app.state.server`)."""

    engine: AsyncEngine
    model_name: str
    max_concurrent: int
    allow_lora_updates: bool
    max_prompts: int = 64
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    in_flight: int = 0
    draining: bool = False  # set on SIGTERM: new requests get 503, those in flight finish
    image_projector: Any = None  # chat image_url parts become prefix embeddings via its prefix_for(image)

    def check_model(self, model: str) -> None:
        loras = self.engine.lora_adapters()
        if model != self.model_name and model not in loras:
            served = ", ".join(repr(m) for m in [self.model_name, *loras])
            raise APIError(404, f"model {model!r} does not exist; this server serves {served} (see /v1/models)",
                           "model", "model_not_found")

    def image_prefix(self, urls: list[str]):
        """The (P, d) prefix embeddings of a chat request's one image (a base64 data URL); 400 when
        the model has no image projector or the image is not one."""
        if self.image_projector is None:
            raise APIError(400, f"model {self.model_name!r} has no image projector, so it cannot take image_url "
                                f"parts; train one with `autoglm align projector --lm RUN` and restart the server, "
                                f"or send text only", "messages", "image_input_not_supported")
        if len(urls) > 1:
            raise APIError(400, f"one image per request is supported, got {len(urls)} image_url parts", "messages")
        try:
            return self.image_projector.prefix_for(decode_image_url(urls[0]))
        except ValueError as e:  # unreadable, corrupt or too small
            raise APIError(400, f"image_url: {e}", "messages") from None

    async def submit(self, prompts: list[list[int]], params: list[SamplingParams], lora: str | None,
                     chat: bool) -> "_Call":
        """Queue every prompt with every SamplingParams (one engine request each)."""
        n = len(prompts) * len(params)
        if self.draining:
            self.metrics.requests.labels("rejected").inc()
            raise APIError(503, "the server is shutting down; send the request to another replica",
                           code="server_shutting_down", kind="service_unavailable_error")
        if n > self.max_concurrent:  # a 429 would never clear: retrying cannot help
            self.metrics.requests.labels("rejected").inc()
            raise APIError(400, f"this request needs {n} sequences ({len(prompts)} prompt(s) x {len(params)} "
                                f"candidates: n or best_of) but the server runs at most {self.max_concurrent} at "
                                f"once; send fewer prompts or a smaller n", "n", "request_too_large")
        if self.in_flight + n > self.max_concurrent:
            self.metrics.requests.labels("rejected").inc()
            raise APIError(429, f"too many concurrent requests ({self.in_flight} of at most {self.max_concurrent} "
                                f"in flight); retry later",
                           code="rate_limit_exceeded", kind="rate_limit_error")
        self.in_flight += n  # reserved before any await, so concurrent handlers see it
        try:
            stream = await self.engine.submit(prompts, params, lora)
        except ValueError as e:  # the engine's one check of the request (InvalidRequestError)
            self.in_flight -= n
            param = getattr(e, "param", None)
            raise APIError(400, str(e), "messages" if chat and param == "prompt" else param,
                           getattr(e, "code", None)) from None
        except BaseException:
            self.in_flight -= n
            raise
        self.metrics.prompt_tokens.inc(sum(len(p) for p in prompts) * len(params))
        return _Call(self, stream, n)


class _Call:
    """One API call in flight: its stream of outputs, its metrics, its share of max_concurrent."""

    def __init__(self, server: _Server, stream: RequestStream, n: int) -> None:
        self.server, self.stream, self.n = server, stream, n
        self.t0 = time.perf_counter()
        self.first: dict[int, float] = {}  # choice -> time of its first output
        self.closed = False

    async def batches(self):
        try:
            async for batch in self.stream:
                self._observe(batch)
                yield batch
        except APIError:
            raise
        except Exception as e:  # noqa: BLE001 - a failed engine step: the client gets a 500
            raise APIError(500, f"engine error: {e}", kind="server_error") from None

    def _observe(self, batch: list[tuple[int, RequestOutput]]) -> None:
        """Per-request latencies (a few observations per request, none per token: on a busy
        server the metrics must not cost per token)."""
        m, now = self.server.metrics, time.perf_counter()
        for i, o in batch:
            if i not in self.first:
                self.first[i] = now
                m.ttft.observe(now - self.t0)
            if o.queue_time is not None:
                m.queue.observe(o.queue_time)
            if o.finished:
                m.e2e.observe(now - self.t0)
                if o.num_output_tokens > 1:
                    m.tpot.observe((now - self.first[i]) / (o.num_output_tokens - 1))
        m.generation_tokens.inc(sum(len(o.new_token_ids) for _, o in batch))

    def close(self) -> None:
        """Count the outcome, cancel what is unfinished (client gone, or an error) and free the slot."""
        if self.closed:
            return
        self.closed = True
        m, s = self.server.metrics, self.stream
        m.requests.labels("finished").inc(self.n - s.num_unfinished)
        if s.num_unfinished:
            m.requests.labels("aborted").inc(s.num_unfinished)
            s.close()
        self.server.in_flight -= self.n


class _APIKeyMiddleware:
    """Plain ASGI middleware: /v1 routes need 'Authorization: Bearer <key>' (no per-chunk cost on streams)."""

    def __init__(self, app, api_key: str) -> None:
        self.app, self.expected = app, f"Bearer {api_key}".encode("latin-1")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            if dict(scope["headers"]).get(b"authorization") != self.expected:
                err = APIError(401, "missing or invalid API key; send 'Authorization: Bearer <key>'",
                               code="invalid_api_key", kind="authentication_error")
                await JSONResponse(err.body(), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(engine: AsyncEngine, model_name: str = "autoglm", api_key: str | None = None,
               max_concurrent: int = 256, allow_lora_updates: bool = False, max_prompts: int = 64,
               image_projector: Any = None) -> FastAPI:
    """The FastAPI app around an AsyncEngine (started on startup, shut down on shutdown).

    max_prompts: the largest batch of prompts one completions request may carry (a list of
    texts or of token-id lists, as lm-evaluation-harness sends); each prompt's n choices
    also count against `max_concurrent`.

    allow_lora_updates: enable POST /v1/load_lora_adapter {"lora_name", "lora_path"} and
    /v1/unload_lora_adapter {"lora_name"} (vLLM's routes): adapters come and go without a
    restart. Off by default, since it lets a client make the server read a local path.

    image_projector: an `ImagePrefixProjector`; chat messages may then carry one `image_url`
    part (a base64 data URL); without one such a request gets a 400 that says so."""
    if model_name in engine.lora_adapters():
        raise ValueError(f"a LoRA adapter is named {model_name!r} like the base model; rename the adapter")
    app = FastAPI(title="Open-AutoGLM", lifespan=_lifespan)
    if max_prompts < 1:
        raise ValueError(f"max_prompts must be >= 1, got {max_prompts}")
    app.state.server = _Server(engine, model_name, max_concurrent, allow_lora_updates, max_prompts,
                               image_projector=image_projector)
    app.add_exception_handler(APIError, lambda _, e: JSONResponse(e.body(), status_code=e.status))
    if api_key is not None:
        app.add_middleware(_APIKeyMiddleware, api_key=api_key)
    app.add_api_route("/v1/completions", completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    app.add_api_route("/v1/load_lora_adapter", load_lora, methods=["POST"])
    app.add_api_route("/v1/unload_lora_adapter", unload_lora, methods=["POST"])
    app.add_api_route("/v1/models", models, methods=["GET"])
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"])
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI):
    engine = app.state.server.engine
    engine.start()
    yield
    engine.shutdown()


# ------------------------------------------------------------------- parsing
async def _parse(request: Request, schema):
    body = await request.body()
    try:
        data = json.loads(body.decode("utf-8"))
        # strings with lone surrogates (e.g. "\ud800") parse as JSON but are not text
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeDecodeError:
        raise APIError(400, "request body is not valid UTF-8; encode the JSON as UTF-8") from None
    except json.JSONDecodeError as e:
        raise APIError(400, f"malformed JSON body: {e}") from None
    except UnicodeEncodeError:
        raise APIError(400, "request contains invalid Unicode (a lone surrogate); send valid UTF-8 text") from None
    except RecursionError:
        raise APIError(400, "request JSON is nested too deeply to parse; flatten it") from None
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        raise APIError(400, f"invalid field '{loc}': {err['msg']} ({len(e.errors())} error(s))", loc) from None


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has already been read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


# -------------------------------------------------------------------- routes
async def completions(request: Request):
    return await _generate(request, CompletionRequest)


async def chat_completions(request: Request):
    return await _generate(request, ChatCompletionRequest)


async def _generate(request: Request, schema):
    srv: _Server = request.app.state.server
    req = await _parse(request, schema)
    srv.check_model(req.model)
    chat = schema is ChatCompletionRequest
    tok = srv.engine.tokenizer
    prompts = encode_prompts(tok, chat_prompt(req.messages) if chat else req.prompt, srv.max_prompts)
    params = sampling_params(req)
    if chat and (urls := [u for m in req.messages for u in m.image_urls]):  # image: prefix placeholders
        prefix = srv.image_prefix(urls)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 1
        prompts = [[pad] * len(prefix) + p for p in prompts]
        params = [replace(p, prefix_embeds=prefix) for p in params]
    texts = echo_texts(tok, req.prompt, prompts) if not chat and req.echo else None
    call = await srv.submit(prompts, params, None if req.model == srv.model_name else req.model, chat)
    out = ResponseBuilder(req, prompts, tok, texts)
    if req.stream:
        return StreamingResponse(_sse(call, out), media_type="text/event-stream")
    return await _whole(request, call, out)


async def _sse(call: _Call, out: ResponseBuilder):
    try:
        if first := out.first_chunk():
            yield first
        async for batch in call.batches():
            yield out.chunk(batch)
        yield out.last_chunks()
    except APIError as e:
        yield out.error_chunk(e)
    finally:  # also when the client went away mid-stream: its requests are cancelled
        call.close()


async def _whole(request: Request, call: _Call, out: ResponseBuilder) -> Response:
    async def collect():
        async for batch in call.batches():
            out.add(batch)

    # a client that hangs up before the answer is ready cancels its requests (their KV blocks
    # go back to the pool) instead of generating for nobody
    work, gone = asyncio.create_task(collect()), asyncio.create_task(_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
            return Response(status_code=499)
        work.result()
        return JSONResponse(out.response())
    finally:
        gone.cancel()
        call.close()


def _lora_updates_allowed(srv: _Server) -> None:
    if not srv.allow_lora_updates:
        raise APIError(403, "loading and unloading LoRA adapters at run time is off; start the server with "
                            "--allow-lora-updates", code="lora_updates_disabled", kind="permission_error")


async def load_lora(request: Request):
    srv: _Server = request.app.state.server
    _lora_updates_allowed(srv)
    req = await _parse(request, LoadLoRARequest)
    if req.lora_name == srv.model_name:
        raise APIError(400, f"{req.lora_name!r} is the base model's name; pick another adapter name", "lora_name")
    try:
        await srv.engine.add_lora(req.lora_name, req.lora_path)
    except FileNotFoundError as e:
        raise APIError(404, str(e), "lora_path", "lora_not_found") from None
    except ValueError as e:
        raise APIError(400, str(e), "lora_path") from None
    return PlainTextResponse(f"LoRA adapter {req.lora_name!r} loaded")


async def unload_lora(request: Request):
    srv: _Server = request.app.state.server
    _lora_updates_allowed(srv)
    req = await _parse(request, UnloadLoRARequest)
    loaded = srv.engine.lora_adapters()
    if req.lora_name not in loaded:
        raise APIError(404, f"no LoRA adapter named {req.lora_name!r} is loaded; loaded: "
                            f"{list(loaded) or 'none'}", "lora_name", "lora_not_found")
    try:
        await srv.engine.remove_lora(req.lora_name)
    except ValueError as e:
        raise APIError(409, str(e), "lora_name", "lora_in_use") from None
    return PlainTextResponse(f"LoRA adapter {req.lora_name!r} unloaded")


async def models(request: Request):
    srv: _Server = request.app.state.server
    card = {"object": "model", "created": 0, "owned_by": "autoglm", "max_model_len": srv.engine.max_model_len}
    data = [{"id": srv.model_name, **card, "root": srv.model_name, "parent": None}]
    data += [{"id": name, **card, "root": str(path), "parent": srv.model_name}
             for name, path in srv.engine.lora_adapters().items()]
    return {"object": "list", "data": data}


async def health(request: Request):
    if request.app.state.server.draining:  # readiness fails, so the pod leaves its Service
        return JSONResponse({"status": "draining"}, status_code=503)
    return {"status": "ok"}


async def metrics(request: Request):
    srv: _Server = request.app.state.server
    m, s = srv.metrics, srv.engine.stats()
    m.waiting.set(s["waiting"])
    m.running.set(s["running"])
    m.kv_used.set(s["kv_blocks_used"])
    m.kv_total.set(s["kv_blocks_total"])
    m.kv_cached.set(s["kv_blocks_cached"])
    m.observe_prefix_cache(s["prefix_queried_tokens"], s["prefix_hit_tokens"])
    return PlainTextResponse(generate_latest(m.registry).decode(), media_type="text/plain; version=0.0.4")


# ------------------------------------------------------------- graceful shutdown
class DrainingServer(uvicorn.Server):
    """uvicorn's server, draining on SIGTERM instead of closing its socket at once: the app
    (`create_app`'s) keeps listening and answers 503 to new requests and to /health while
    the requests in flight finish; it exits when none is left or after `drain_timeout`
    seconds. SIGINT, or a second SIGTERM, keeps uvicorn's own (immediate) shutdown."""

    def __init__(self, config: uvicorn.Config, drain_timeout: float = 30.0) -> None:
        super().__init__(config)
        if drain_timeout < 0:
            raise ValueError(f"drain_timeout must be >= 0 seconds, got {drain_timeout}")
        self.drain_timeout = drain_timeout
        self.drain_since: float | None = None

    def begin_drain(self) -> None:
        srv: _Server = self.config.app.state.server
        srv.draining = True
        self.drain_since = time.monotonic()
        log.info("draining: %d request(s) in flight, new requests get 503 (at most %.0f s)", srv.in_flight,
                 self.drain_timeout)

    def handle_exit(self, sig: int, frame) -> None:
        if sig == signal.SIGTERM and self.drain_since is None:
            self.begin_drain()
        else:
            super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self.drain_since is not None and not self.should_exit:
            left = self.config.app.state.server.in_flight
            if left == 0 or time.monotonic() - self.drain_since > self.drain_timeout:
                if left:
                    log.warning("drain timeout (%.0f s): %d request(s) still in flight are cut off",
                                self.drain_timeout, left)
                self.should_exit = True
        return await super().on_tick(counter)


def serve_app(app: FastAPI, host: str, port: int, drain_timeout: float = 30.0, log_level: str = "info",
              cutoff: float = 5.0) -> None:
    """Run `create_app`'s app with uvicorn until SIGINT, or SIGTERM and a drain (`DrainingServer`).
    `cutoff`: once the drain is over (or timed out), seconds uvicorn waits for open
    connections before cancelling them (without it, a stream still open would hold the exit)."""
    DrainingServer(uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=cutoff),
                   drain_timeout).run()
