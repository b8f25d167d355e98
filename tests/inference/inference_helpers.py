"""Helpers shared by the inference tests."""

import torch

from autoglm import OpenAutoGLMConfig
from autoglm.hf import OpenAutoGLMForCausalLM


def make_model(preset="tiny", seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = OpenAutoGLMConfig.from_name(preset, initializer_range=0.2, **overrides)
    return OpenAutoGLMForCausalLM(cfg).eval()


def prompts(n, lo, hi, vocab=512, seed=0):
    """n random prompts of lengths in [lo, hi) (token ids >= 2: no EOS/pad)."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [torch.randint(2, vocab, (L,), generator=g).tolist() for L in lens]


class BackgroundServer:
    """Run an ASGI app with uvicorn on a free 127.0.0.1 port in a daemon thread.

    `with BackgroundServer(app) as url: ...` gives "http://127.0.0.1:PORT"."""

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
        import time

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
