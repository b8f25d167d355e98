"""Graceful shutdown of `autoglm serve`. While a streamed request is in flight, SIGTERM turns
/health and new requests into 503 (the port stays open), the in-flight request still gets
every token it asked for, and the server then exits by itself.

In process (fast): the server runs in a thread and its SIGTERM handler is called directly;
the engine's steps are held by a gate, so the request stays in flight exactly as long as
the test wants. End to end (slow): a real `autoglm serve` process and a real SIGTERM."""

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

MAX_TOKENS = 200  # the small preset decodes ~20 ms/token on one core: seconds in flight


def save_run(d: Path, preset: str) -> Path:
    from autoglm import OpenAutoGLMConfig
    from autoglm.data import stdlib_docstring_corpus
    from autoglm.hf import OpenAutoGLMForCausalLM
    from autoglm.tokenizer import save_tokenizer, train_tokenizer

    torch.manual_seed(0)
    OpenAutoGLMForCausalLM(OpenAutoGLMConfig.from_name(preset, vocab_size=512)).eval().save_pretrained(d)
    docs = stdlib_docstring_corpus(Path(sysconfig.get_paths()["stdlib"]) / "asyncio")
    save_tokenizer(train_tokenizer(docs, vocab_size=512), d)
    return d


def first_event(r) -> bytes:
    line = r.readline()
    while not line.startswith(b"data: "):
        line = r.readline()
    return line


def finish_reason(first: bytes, rest: bytes) -> str | None:
    """The last finish_reason of a streamed completion (whose last event must be [DONE])."""
    chunks = [first] + [x for x in rest.split(b"\n") if x.startswith(b"data: ")]
    assert chunks[-1].strip() == b"data: [DONE]"
    finish = None
    for c in chunks[:-1]:
        finish = json.loads(c[6:])["choices"][0].get("finish_reason") or finish
    return finish


BODY = {"model": "m", "prompt": "the event loop", "max_tokens": 40, "ignore_eos": True, "temperature": 0,
        "stream": True}


def test_drain_in_process(tmp_path):
    import threading

    import uvicorn

    from autoglm.inference import LLMEngine
    from autoglm.inference.async_engine import AsyncEngine
    from autoglm.inference.engine_core import EngineConfig
    from autoglm.inference.server import DrainingServer, create_app
    from autoglm.rundir import RunDir

    model, tok = RunDir.open(save_run(tmp_path, "tiny")).load()
    engine = AsyncEngine(LLMEngine(model, tok, EngineConfig(num_blocks=64)))
    gate, steps = threading.Event(), []
    core = engine._core
    step = core.step

    def gated_step():  # the first step runs; the rest wait for the test
        if steps:
            gate.wait()
        steps.append(1)
        return step()

    core.step = gated_step
    port = _free_port()
    server = DrainingServer(uvicorn.Config(create_app(engine, model_name="m"), host="127.0.0.1", port=port,
                                           log_level="warning"), drain_timeout=60)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60.0)
        conn.request("POST", "/v1/completions", json.dumps(BODY), {"Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status == 200
        first = first_event(r)
        server.handle_exit(signal.SIGTERM, None)  # what the process's signal handler calls
        assert _get(f"{url}/health") == (503, {"status": "draining"})
        status, new = _get(f"{url}/v1/completions", "POST", {**BODY, "stream": False})
        assert status == 503 and new["error"]["code"] == "server_shutting_down", new
        time.sleep(0.3)
        assert thread.is_alive() and not server.should_exit  # the request in flight holds the exit
        gate.set()
        assert finish_reason(first, r.read()) == "length"  # it ran to its max_tokens
        conn.close()
        thread.join(timeout=30)
        assert not thread.is_alive()  # exited by itself once nothing was in flight
    finally:
        gate.set()
        server.should_exit = True
        thread.join(timeout=10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, method: str = "GET", body: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, method=method, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=5.0) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"autoglm serve exited early ({proc.returncode}): {proc.stderr.read()}")
        try:
            if _get(f"{url}/health")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError("autoglm serve did not become healthy in time")


@pytest.mark.slow
def test_sigterm_drains_in_flight_and_refuses_new_requests(tmp_path):
    run_dir = save_run(tmp_path, "small")  # the small preset: seconds per request, in flight long enough
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", "from autoglm.cli import main; main()", "serve", str(run_dir),
                             "--port", str(port), "--num-blocks", "256", "--served-model-name", "m"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        _wait_healthy(url, proc)
        body = {"model": "m", "prompt": "the event loop", "max_tokens": MAX_TOKENS, "ignore_eos": True,
                "temperature": 0, "stream": True}
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60.0)
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status == 200
        first = first_event(r)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)  # the signal is handled between event-loop ticks
        assert proc.poll() is None, "the server exited with a request in flight"
        assert _get(f"{url}/health") == (503, {"status": "draining"})
        status, new = _get(f"{url}/v1/completions", "POST", {**body, "stream": False, "max_tokens": 4})
        assert status == 503 and new["error"]["code"] == "server_shutting_down", new
        assert finish_reason(first, r.read()) == "length"  # the in-flight request ran to its max_tokens
        conn.close()
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_drain_timeout_ends_the_wait(tmp_path):
    """A request that would stay in flight forever does not hold the exit past drain_timeout."""
    import threading

    import uvicorn

    from autoglm.inference import LLMEngine
    from autoglm.inference.async_engine import AsyncEngine
    from autoglm.inference.engine_core import EngineConfig
    from autoglm.inference.server import DrainingServer, create_app
    from autoglm.rundir import RunDir

    model, tok = RunDir.open(save_run(tmp_path, "tiny")).load()
    engine = AsyncEngine(LLMEngine(model, tok, EngineConfig(num_blocks=64)))
    app = create_app(engine, model_name="m")
    server = DrainingServer(uvicorn.Config(app, host="127.0.0.1", port=_free_port(), log_level="warning",
                                           timeout_graceful_shutdown=1), drain_timeout=1.0)
    held, at_exit = [], {}
    core, step = engine._core, engine._core.step

    def stuck_step():  # after the first step, nothing more until the server gives up waiting
        if held:
            while not server.should_exit:
                time.sleep(0.02)
            at_exit.setdefault("in_flight", app.state.server.in_flight)
        held.append(1)
        return step()

    core.step = stuck_step
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        conn = http.client.HTTPConnection("127.0.0.1", server.config.port, timeout=60.0)
        conn.request("POST", "/v1/completions", json.dumps(BODY), {"Content-Type": "application/json"})
        first_event(conn.getresponse())
        t0 = time.monotonic()
        server.handle_exit(signal.SIGTERM, None)
        while not server.should_exit and time.monotonic() - t0 < 30:
            time.sleep(0.02)
        waited = time.monotonic() - t0
        assert 1.0 <= waited < 10, waited  # drain_timeout, measured on a loaded machine
        thread.join(timeout=30)
        assert not thread.is_alive() and at_exit == {"in_flight": 1}  # it gave up with the request in flight
        conn.close()
    finally:
        server.should_exit = server.force_exit = True
        thread.join(timeout=10)
