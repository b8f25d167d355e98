"""Multi-LoRA through the HTTP server and `autoglm serve --lora`, with the official openai client."""

import copy
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
from peft import PeftModel
from typer.testing import CliRunner

from autoglm.cli import app as cli_app
from autoglm.recipes.serve import parse_lora_specs
from autoglm.inference import EngineConfig, LLMEngine
from autoglm.inference.async_engine import AsyncEngine
from autoglm.inference.server import create_app

from inference_helpers import BackgroundServer, make_model
from test_multi_lora import peft_greedy, save_adapter


@pytest.fixture(scope="module")
def lora_server(tmp_path_factory, tiny_tokenizer):
    base = make_model("tiny", seed=1)
    d = tmp_path_factory.mktemp("loras")
    paths = {"A": save_adapter(base, d / "a", 1, target_modules=["q_proj", "v_proj"]),
             "B": save_adapter(base, d / "b", 2, r=8, target_modules=["k_proj", "o_proj"])}
    ref = PeftModel.from_pretrained(copy.deepcopy(base), paths["A"], adapter_name="A").eval()
    ref.load_adapter(paths["B"], adapter_name="B")
    engine = LLMEngine(base, tiny_tokenizer, EngineConfig(block_size=8, num_blocks=128))
    for name, p in paths.items():
        engine.add_lora(name, p)
    with BackgroundServer(create_app(AsyncEngine(engine), model_name="tiny")) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0), ref, tiny_tokenizer


def reference_text(ref, tok, prompt, model, n):
    ids = tok(prompt).input_ids
    if model == "tiny":
        with ref.disable_adapter():
            out = peft_greedy(ref, ids, n)
    else:
        ref.set_adapter(model)
        out = peft_greedy(ref, ids, n)
    return tok.decode(out, skip_special_tokens=True)


def test_models_lists_base_and_adapters(lora_server):
    client = lora_server[0]
    cards = {m.id: m for m in client.models.list().data}
    assert list(cards) == ["tiny", "A", "B"]
    assert cards["A"].parent == "tiny" and cards["tiny"].parent is None


def test_concurrent_requests_pick_adapter_by_model(lora_server):
    client, ref, tok = lora_server
    jobs = [(p, m) for p in ("Return the value", "Open the file and") for m in ("A", "tiny", "B")]

    def call(job):
        prompt, model = job
        out = client.completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0,
                                        extra_body={"ignore_eos": True})
        assert out.model == model
        return out.choices[0].text

    with ThreadPoolExecutor(len(jobs)) as pool:  # all in flight at once: mixed adapters in each step
        texts = list(pool.map(call, jobs))
    for (prompt, model), text in zip(jobs, texts):
        assert text == reference_text(ref, tok, prompt, model, 10), (prompt, model)
    assert len({t for (p, _), t in zip(jobs, texts) if p == "Return the value"}) > 1  # adapters matter


def test_streaming_chat_on_adapter_and_unknown_model(lora_server):
    client, ref, tok = lora_server
    msgs = [{"role": "user", "content": "Open the file"}]
    chunks = list(client.chat.completions.create(model="B", messages=msgs, max_tokens=8, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True}))
    assert {c.model for c in chunks} == {"B"}
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reference_text(ref, tok, "user: Open the file\nassistant:", "B", 8)
    with pytest.raises(openai.NotFoundError, match="'tiny', 'A', 'B'"):
        client.completions.create(model="C", prompt="x", max_tokens=2)


def test_adapter_named_like_base_is_refused(tmp_path):
    base = make_model("tiny")
    engine = LLMEngine(base, config=EngineConfig(block_size=8, num_blocks=32))
    engine.add_lora("tiny", save_adapter(base, tmp_path / "a", 1, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="named 'tiny' like the base model"):
        create_app(AsyncEngine(engine), model_name="tiny")


def test_cli_lora_specs(tmp_path, tiny_tokenizer_dir):
    assert parse_lora_specs(["a=x/y", "b = z"], "base") == [("a", Path("x/y")), ("b", Path("z"))]
    for bad, msg in [(["a"], "expected NAME=ADAPTER_DIR"), (["=x"], "expected NAME=ADAPTER_DIR"),
                     (["a=x", "a=y"], "given twice"), (["base=x"], "base model's served name")]:
        with pytest.raises(ValueError, match=msg):
            parse_lora_specs(bad, "base")
    # `autoglm serve` refuses a bad adapter before it starts serving
    model_dir = tmp_path / "m"
    base = make_model("tiny")
    base.save_pretrained(model_dir)
    for f in tiny_tokenizer_dir.iterdir():
        shutil.copy2(f, model_dir / f.name)
    other = save_adapter(make_model("tiny", hidden_size=32), tmp_path / "other", 1, target_modules=["q_proj"])
    res = CliRunner().invoke(cli_app, ["serve", str(model_dir), "--lora", f"x={other}"])
    assert res.exit_code == 2
    assert "other dimensions" in " ".join(res.output.split())


def test_load_and_unload_adapters_without_restart(tmp_path, tiny_tokenizer):
    import httpx2 as httpx

    base = make_model("tiny", seed=1)
    path = save_adapter(base, tmp_path / "c", 3, target_modules=["q_proj", "v_proj"])
    ref = PeftModel.from_pretrained(copy.deepcopy(base), path, adapter_name="C").eval()
    engine = LLMEngine(base, tiny_tokenizer, EngineConfig(block_size=8, num_blocks=128))
    locked = create_app(AsyncEngine(engine), model_name="tiny")
    with BackgroundServer(locked) as url:  # off by default: 403 naming the flag
        r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "C", "lora_path": str(path)})
        assert r.status_code == 403 and "--allow-lora-updates" in r.json()["error"]["message"]
    engine = LLMEngine(base, tiny_tokenizer, EngineConfig(block_size=8, num_blocks=128))
    with BackgroundServer(create_app(AsyncEngine(engine), model_name="tiny", allow_lora_updates=True)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "C", "lora_path": str(path)})
        assert r.status_code == 200
        assert [m.id for m in client.models.list().data] == ["tiny", "C"]
        out = client.completions.create(model="C", prompt="Return the value", max_tokens=10, temperature=0)
        assert out.choices[0].text == reference_text(ref, tiny_tokenizer, "Return the value", "C", 10)
        bad = [({"lora_name": "D", "lora_path": str(tmp_path / "missing")}, 404),
               ({"lora_name": "C", "lora_path": str(path)}, 400),  # name taken
               ({"lora_name": "tiny", "lora_path": str(path)}, 400),  # the base model's name
               ({"lora_name": "E"}, 400)]  # no path
        for body, code in bad:
            assert httpx.post(url + "/v1/load_lora_adapter", json=body).status_code == code, body
        assert httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "C"}).status_code == 200
        assert httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "C"}).status_code == 404
        assert [m.id for m in client.models.list().data] == ["tiny"]
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="C", prompt="x", max_tokens=2)
        assert client.completions.create(model="tiny", prompt="x", max_tokens=2).choices[0].text is not None
