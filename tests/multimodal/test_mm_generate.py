"""`autoglm align projector` on a small run, then `autoglm generate RUN --image` against the engine
run directly with the projector's prefix; a run without a projector says how to make one."""

import json

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from autoglm.config import OpenAutoGLMConfig
from autoglm.hf import OpenAutoGLMForCausalLM
from autoglm.inference import EngineConfig, LLMEngine, SamplingParams
from autoglm.multimodal.projector import image_tensor, load_image_projector
from autoglm.recipes.align import AlignConfig, ProjectorConfig, align, train_projector
from autoglm.rundir import RunDir
from autoglm.settings import load_config
from autoglm.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer

from .test_mm_recipe import SMALL


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    align(load_config(AlignConfig, overrides={**SMALL, "out": str(root / "aligned"), "train.max_steps": 2}),
          progress=False, evaluate_at_end=False)
    from autoglm.multimodal.data import load_digits_pairs

    caps = [c for cs in load_digits_pairs().captions[:200] for c in cs]
    save_tokenizer(train_tokenizer(caps, vocab_size=300), root / "tok")
    tok = load_tokenizer(root / "tok")
    torch.manual_seed(0)
    lm = OpenAutoGLMForCausalLM(OpenAutoGLMConfig.from_name("tiny", vocab_size=len(tok)))
    RunDir.save(root / "lm", lm, tok, {"recipe": "test"})
    RunDir.save(root / "lm_plain", lm, tok, {"recipe": "test"})
    return root


def test_projector_then_generate_with_image(runs, tmp_path):
    from autoglm.cli import app

    cfg = load_config(ProjectorConfig, overrides={"align_dir": str(runs / "aligned"), "lm": str(runs / "lm"),
                                                  "train.max_steps": 3, "train.batch_size": 8, "eval_samples": 4,
                                                  "prefix_tokens": 2, "hidden": 32})
    res = train_projector(cfg, progress=False)
    assert (runs / "lm" / "adapters" / "image" / "adapter_config.json").is_file() and res["eval_images"] == 4
    assert 0 <= res["caption_acc"] <= 100 and len(res["samples"]) == 4
    cfg_json = json.loads((runs / "lm" / "adapters" / "image" / "adapter_config.json").read_text())
    assert cfg_json["type"] == "image-prefix"
    png = tmp_path / "digit.png"
    Image.new("L", (8, 8), 0).save(png)
    r = CliRunner().invoke(app, ["generate", str(runs / "lm"), "--image", str(png), "--prompt", "", "--greedy",
                                 "--max-new-tokens", "5"])
    assert r.exit_code == 0, r.output
    lm, tok = RunDir.open(runs / "lm").load()
    proj = load_image_projector(runs / "lm")
    with torch.no_grad():
        prefix = proj(image_tensor(png, proj))[0]
    eng = LLMEngine(lm, tok, EngineConfig(block_size=16, num_blocks=32))
    (req,) = eng.generate([[1, 1]], SamplingParams(max_tokens=5, temperature=0.0, prefix_embeds=prefix))
    want = tok.decode(req.output_ids, skip_special_tokens=True).strip()
    assert r.output.splitlines()[0].strip() == want if want else "tokens in" in r.output


def test_generate_image_errors(runs, tmp_path):
    from autoglm.cli import app

    png = tmp_path / "digit.png"
    Image.new("L", (8, 8), 0).save(png)
    r = CliRunner().invoke(app, ["generate", str(runs / "lm_plain"), "--image", str(png)])
    assert r.exit_code == 2 and "has no image projector" in r.output and "autoglm align projector" in r.output


def test_projector_cli_on_data_without_classes(runs, tmp_path):
    from autoglm.cli import app

    for i in range(10):
        Image.new("L", (8, 8), 20 * i).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(f"a handwritten {i}\n")
    r = CliRunner().invoke(app, ["align", "projector", "--align-dir", str(runs / "aligned"), "--lm", str(runs / "lm"),
                                 "--name", "pairs", "--data", str(tmp_path), "--steps", "1", "--batch-size", "4",
                                 "--prefix-tokens", "2", "--hidden", "16"])
    assert r.exit_code == 0, r.output
    assert "the data has no classes: no caption accuracy" in " ".join(r.output.split())
    assert (runs / "lm" / "adapters" / "pairs" / "adapter_config.json").is_file()
