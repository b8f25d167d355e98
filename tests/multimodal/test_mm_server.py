"""Chat requests with an image (`image_url` data URL) against the real server, with the official
client: the reply equals the engine run directly with the projector's prefix; a model without a
projector, several images and a broken data URL get 400s that say so."""

import base64
import importlib.util
import io
import sys
from pathlib import Path

import openai
import pytest
import torch
from PIL import Image

from autoglm.config import OpenAutoGLMConfig
from autoglm.hf import OpenAutoGLMForCausalLM
from autoglm.inference import EngineConfig, LLMEngine, SamplingParams
from autoglm.inference.async_engine import AsyncEngine
from autoglm.inference.server import chat_prompt, create_app
from autoglm.multimodal.projector import ImagePrefixProjector, image_tensor
from autoglm.tokenizer import _wrap, train_tokenizer

from .helpers import tiny_image_cfg

if "inference_helpers" not in sys.modules:
    _spec = importlib.util.spec_from_file_location("inference_helpers",
                                                   Path(__file__).parents[1] / "inference" / "inference_helpers.py")
    sys.modules["inference_helpers"] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules["inference_helpers"])
from inference_helpers import BackgroundServer  # noqa: E402


def _data_url(value: int) -> str:
    buf = io.BytesIO()
    img = Image.new("L", (8, 8), 0)
    img.paste(value, (2, 2, 6, 6))
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    tok = _wrap(train_tokenizer(["a photo of the digit seven", "user: describe", "assistant: a seven"] * 5,
                                vocab_size=300))
    lm = OpenAutoGLMForCausalLM(OpenAutoGLMConfig.from_name("tiny", vocab_size=len(tok))).eval()
    proj = ImagePrefixProjector(tiny_image_cfg().to_dict(), embed_dim=16, lm_hidden=64, prefix_tokens=3,
                                hidden=32).eval()
    with torch.no_grad():
        for p in proj.mlp.parameters():
            p.mul_(20)  # a prefix large enough to move the random LM's greedy choice
    return lm, tok, proj


def _client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)


def test_chat_image_matches_engine_with_prefix(setup):
    lm, tok, proj = setup
    engine = LLMEngine(lm, tok, EngineConfig(block_size=8, num_blocks=64))
    msgs = [{"role": "user", "content": [{"type": "text", "text": "describe"},
                                         {"type": "image_url", "image_url": {"url": _data_url(255)}}]}]
    with BackgroundServer(create_app(AsyncEngine(engine), model_name="tiny", image_projector=proj)) as url:
        out = _client(url).chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0,
                                                   logprobs=True)
        dark = _client(url).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": [{"type": "text", "text": "describe"},
                                                                  {"type": "image_url",
                                                                   "image_url": {"url": _data_url(0)}}]}],
            max_tokens=8, temperature=0, logprobs=True)
        with pytest.raises(openai.BadRequestError, match="one image per request"):
            _client(url).chat.completions.create(model="tiny", max_tokens=4, messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(9)}}] * 2}])
        with pytest.raises(openai.BadRequestError, match="base64 data URL"):
            _client(url).chat.completions.create(model="tiny", max_tokens=4, messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}])
        with pytest.raises(openai.BadRequestError, match="not a readable image"):
            _client(url).chat.completions.create(model="tiny", max_tokens=4, messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {
                    "url": "data:image/png;base64," + base64.b64encode(b"not a png").decode()}}]}])
    # the reference: the same prompt through a fresh engine, the prefix set on the request directly
    ref = LLMEngine(lm, tok, EngineConfig(block_size=8, num_blocks=64))
    text = chat_prompt(type("M", (), {"role": "user", "content": "describe"})() for _ in [0])
    with torch.no_grad():
        prefix = proj(image_tensor(base64.b64decode(_data_url(255).split(",")[1]), proj))[0]
    (r,) = ref.generate([[1] * 3 + tok(text).input_ids], SamplingParams(max_tokens=8, temperature=0.0,
                                                                        prefix_embeds=prefix))
    assert out.choices[0].message.content == ref.text_of(r)
    assert out.usage.prompt_tokens == 3 + len(tok(text).input_ids)
    lp = lambda o: o.choices[0].logprobs.content[0].logprob  # noqa: E731
    assert abs(lp(dark) - lp(out)) > 1e-4  # the image matters


def test_model_without_projector_refuses_images(setup):
    lm, tok, _ = setup
    engine = LLMEngine(lm, tok, EngineConfig(block_size=8, num_blocks=64))
    with BackgroundServer(create_app(AsyncEngine(engine), model_name="tiny")) as url:
        with pytest.raises(openai.BadRequestError, match="has no image projector") as e:
            _client(url).chat.completions.create(model="tiny", max_tokens=4, messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(255)}}]}])
        assert e.value.status_code == 400
        ok = _client(url).chat.completions.create(model="tiny", max_tokens=4, messages=[
            {"role": "user", "content": [{"type": "text", "text": "describe"}]}])
        assert ok.choices[0].finish_reason in ("length", "stop")
