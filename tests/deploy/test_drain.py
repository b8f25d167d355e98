"""Graceful shutdown of `autoglm serve`: a real process, a real SIGTERM. While a long
streamed request is in flight, SIGTERM turns /health and new requests into 503 (the port
stays open), the in-flight request still gets every token it asked for, and the process
then exits by itself with status 0."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import http.client
import urllib.error
import urllib.request

import pytest
import torch

MAX_TOKENS = 300


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from autoglm import OpenAutoGLMConfig
    from autoglm.data import stdlib_docstring_corpus
    from autoglm.hf import OpenAutoGLMForCausalLM
    from autoglm.tokenizer import save_tokenizer, train_tokenizer

    d = tmp_path_factory.mktemp("drain-run")
    torch.manual_seed(0)
    cfg = OpenAutoGLMConfig.from_name("tiny", max_position_embeddings=2048)
    OpenAutoGLMForCausalLM(cfg).eval().save_pretrained(d)
    docs = stdlib_docstring_corpus(Path(sysconfig.get_paths()["stdlib"]) / "asyncio")
    save_tokenizer(train_tokenizer(docs, vocab_size=512), d)
    return d


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


def test_sigterm_drains_in_flight_and_refuses_new_requests(run_dir):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", "from autoglm.cli import main; main()", "serve", str(run_dir), "--port", str(port),
                             "--num-blocks", "256", "--served-model-name", "m"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        _wait_healthy(url, proc)
        body = {"model": "m", "prompt": "the event loop", "max_tokens": MAX_TOKENS, "ignore_eos": True,
                "temperature": 0, "stream": True}
        finish = None
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60.0)
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status == 200
        line = r.readline()
        while not line.startswith(b"data: "):
            line = r.readline()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)  # the signal is handled between event-loop ticks
        assert proc.poll() is None, "the server exited with a request in flight"
        assert _get(f"{url}/health") == (503, {"status": "draining"})
        status, new = _get(f"{url}/v1/completions", "POST", {**body, "stream": False, "max_tokens": 4})
        assert status == 503 and new["error"]["code"] == "server_shutting_down", new
        chunks = [line] + [x for x in r.read().split(b"\n") if x.startswith(b"data: ")]
        conn.close()
        for c in chunks:
            if c.strip() != b"data: [DONE]":
                finish = json.loads(c[6:])["choices"][0].get("finish_reason") or finish
        assert chunks[-1].strip() == b"data: [DONE]"
        assert finish == "length"  # the in-flight request ran to its max_tokens
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
