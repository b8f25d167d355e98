"""LoRA runs as PEFT users expect them: modules_to_save trained, saved and merged; the adapter
loads with PEFT's own `AutoPeftModelForCausalLM` from any directory; `--overwrite` never
loses the previous run to a bad input."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from autoglm.cli import app
from autoglm.recipes.finetune import FinetuneConfig, LoraSpec, finetune
from autoglm.settings import ConfigError, load_config
from autoglm.training import TrainConfig
from autoglm.training.lora import load_lora, merge_lora

from helpers import make_model_dir, make_tokenizer

runner = CliRunner()
TRAIN = TrainConfig(batch_size=4, seq_len=32, max_steps=4, warmup_steps=1, lr=1e-2, eval_every=0, save_every=0,
                    log_every=2)


def sft_file(path):
    path.write_text("".join(json.dumps({"prompt": f"Q{i}: to be", "completion": " or not to be."}) + "\n"
                            for i in range(16)))
    return path


def test_modules_to_save_are_trained_saved_and_merged(tmp_path):
    make_tokenizer(tmp_path / "tok")
    base = make_model_dir(tmp_path / "base", tmp_path / "tok")
    data = sft_file(tmp_path / "sft.jsonl")
    cfg = FinetuneConfig(base=base, data=data, out=tmp_path / "ad", train=TRAIN,
                         lora=LoraSpec(enabled=True, targets=("q_proj",), modules_to_save=("router",)))
    finetune(cfg, progress=False)
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["modules_to_save"] == ["router"]
    saved = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    routers = sorted(k for k in saved if ".router." in k)
    assert routers == [f"base_model.model.model.layers.{i}.mlp.router.weight" for i in (0, 1)]
    plain = AutoModelForCausalLM.from_pretrained(base)
    assert not torch.equal(saved[routers[0]], plain.model.layers[0].mlp.router.weight)  # it was trained
    merge_lora(tmp_path / "ad", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(merged.model.layers[1].mlp.router.weight, saved[routers[1]])
    x = torch.randint(0, merged.config.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, load_lora(tmp_path / "ad")(x).logits, rtol=1e-5, atol=1e-5)


def test_modules_to_save_names_are_checked(tmp_path):
    make_tokenizer(tmp_path / "tok")
    base = make_model_dir(tmp_path / "base", tmp_path / "tok")
    data = sft_file(tmp_path / "sft.jsonl")
    cfg = FinetuneConfig(base=base, data=data, out=tmp_path / "ad", train=TRAIN,
                         lora=LoraSpec(enabled=True, modules_to_save=("router", "routr")))
    with pytest.raises(ValueError, match="modules_to_save entry 'routr' matches no module"):
        finetune(cfg, progress=False)
    assert not (tmp_path / "ad").exists()
    # the check agrees with PEFT's own matching: accepted exactly where PEFT wraps a module
    from peft import LoraConfig, get_peft_model
    from peft.utils import ModulesToSaveWrapper

    from autoglm import OpenAutoGLMConfig, OpenAutoGLMForCausalLM
    from autoglm.recipes.finetune import check_modules_to_save

    for name in ("layernorm", "router", "layers.1.mlp.router", "routr", "layers.2.mlp.router"):
        model = OpenAutoGLMForCausalLM(OpenAutoGLMConfig.from_name("tiny"))
        wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=[name]))
        peft_hits = sum(isinstance(m, ModulesToSaveWrapper) for m in wrapped.modules())
        fresh = OpenAutoGLMForCausalLM(OpenAutoGLMConfig.from_name("tiny"))
        if peft_hits:
            assert check_modules_to_save(fresh, [name]) == [name]
        else:
            with pytest.raises(ValueError, match=f"entry {name!r} matches no module"):
                check_modules_to_save(fresh, [name])
    with pytest.raises(ConfigError, match=r"alpha( \(--lora-alpha\))? must be > 0"):
        load_config(FinetuneConfig, overrides={"base": str(base), "data": str(data), "out": "o",
                                               "lora.enabled": "true", "lora.alpha": "-3"})


def test_adapter_loads_with_plain_peft_from_another_directory(tmp_path, monkeypatch):
    from peft import AutoPeftModelForCausalLM

    make_tokenizer(tmp_path / "tok")
    make_model_dir(tmp_path / "runs" / "base", tmp_path / "tok")
    sft_file(tmp_path / "sft.jsonl")
    monkeypatch.chdir(tmp_path)  # the user gives relative paths, as in the README
    finetune(FinetuneConfig(base="runs/base", data="sft.jsonl", out="runs/ad", train=TRAIN,
                            lora=LoraSpec(enabled=True)), progress=False)
    recorded = json.loads((tmp_path / "runs" / "ad" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str((tmp_path / "runs" / "base").resolve())
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    peft_model = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "runs" / "ad").eval()
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path / "runs" / "ad").eval()  # transformers' PEFT path
    ours = load_lora(tmp_path / "runs" / "ad")
    x = torch.randint(0, ours.config.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x).logits, ours(x).logits, rtol=0, atol=0)
        torch.testing.assert_close(hf_model(x).logits, ours(x).logits, rtol=0, atol=0)


@pytest.mark.parametrize("bad", ["target", "data"])
def test_overwrite_keeps_the_previous_run_when_an_input_is_wrong(tmp_path, bad):
    make_tokenizer(tmp_path / "tok")
    base = make_model_dir(tmp_path / "base", tmp_path / "tok")
    data = sft_file(tmp_path / "sft.jsonl")
    common = ["--steps", "2", "--batch-size", "2", "--seq-len", "32", "--out", str(tmp_path / "ad")]
    r = runner.invoke(app, ["finetune", str(base), "--lora", "--data", str(data), *common])
    assert r.exit_code == 0, r.output
    before = (tmp_path / "ad" / "adapter_model.safetensors").read_bytes()
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"question": "a", "answer": "b"}\n')
    args = ["--target", "q_prj", "--data", str(data)] if bad == "target" else ["--data", str(wrong)]
    r = runner.invoke(app, ["finetune", str(base), "--lora", "--overwrite", *args, *common])
    assert r.exit_code == 2 and ("q_prj" in r.output if bad == "target" else "completion" in r.output), r.output
    assert (tmp_path / "ad" / "adapter_model.safetensors").read_bytes() == before


def test_hf_forward_conventions():
    """return_dict=False gives the tuple HF code unpacks (loss, logits, ...); inputs_embeds
    together with input_ids is refused instead of one being dropped; wrapping with PEFT raises no FutureWarning
    (transformers 5 deprecates the `is_gradient_checkpointing` alias PEFT reads)."""
    import warnings

    from peft import LoraConfig, get_peft_model

    from autoglm import OpenAutoGLMConfig, OpenAutoGLMForCausalLM

    torch.manual_seed(0)
    model = OpenAutoGLMForCausalLM(OpenAutoGLMConfig.from_name("tiny")).eval()
    x = torch.randint(0, 512, (2, 9))
    with torch.no_grad():
        out = model(x, labels=x)
        loss, logits, *_ = model(x, labels=x, return_dict=False)
    assert torch.equal(loss, out.loss) and torch.equal(logits, out.logits)
    with pytest.raises(ValueError, match="exactly one of input_ids .* or inputs_embeds .* got both"):
        model(input_ids=x, inputs_embeds=model.get_input_embeddings()(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    assert peft_model.is_gradient_checkpointing is False
    model._set_gradient_checkpointing(True)
    assert model.is_gradient_checkpointing is True


def test_lora_modules_named_without_lora_are_refused(tmp_path):
    """`--target` / `--modules-to-save` without `--lora` used to run a full fine-tuning and save
    a full model where the user asked for an adapter; now it is refused before any work."""
    make_tokenizer(tmp_path / "tok")
    base = make_model_dir(tmp_path / "base", tmp_path / "tok")
    data = sft_file(tmp_path / "sft.jsonl")
    r = runner.invoke(app, ["finetune", str(base), "--target", "q_proj,o_proj", "--data", str(data),
                            "--out", str(tmp_path / "o"), "--steps", "1"])
    out = " ".join(r.output.split())
    assert r.exit_code == 2 and "lora.targets (--target) is a LoRA option but LoRA is off: add --lora" in out, out
    assert not (tmp_path / "o").exists()
    with pytest.raises(ConfigError, match=r"lora.modules_to_save \(--modules-to-save\) is a LoRA option"):
        load_config(FinetuneConfig, overrides={"base": str(base), "data": str(data), "out": "o",
                                               "lora.modules_to_save": "router"})
    # the defaults, and r / alpha of a full run, are fine
    cfg = load_config(FinetuneConfig, overrides={"base": str(base), "data": str(data), "out": "o", "lora.r": "4"})
    assert not cfg.lora.enabled and cfg.lora.targets == ("q_proj", "v_proj")


@pytest.mark.parametrize("kind", ["text", "jsonl"])
def test_seq_len_past_the_base_models_context_is_refused(tmp_path, kind):
    make_tokenizer(tmp_path / "tok")
    base = make_model_dir(tmp_path / "base", tmp_path / "tok")  # tiny: 256 positions
    data = sft_file(tmp_path / "sft.jsonl") if kind == "jsonl" else tmp_path / "d.txt"
    if kind == "text":
        data.write_text("to be or not to be " * 400)
    long = TrainConfig(**{**TRAIN.__dict__, "seq_len": 300})
    cfg = FinetuneConfig(base=base, data=data, out=tmp_path / "o", train=long, lora=LoraSpec(enabled=True),
                         cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match=r"--seq-len 300\) is longer than the base model's context "
                                         r"\(max_position_embeddings=256\)"):
        finetune(cfg, progress=False)
    assert not (tmp_path / "o").exists()
