"""LoRA through PEFT: target checks, merge equivalence, adapter-only saves, completion-only loss."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from autoglm import OpenAutoGLMConfig, OpenAutoGLMForCausalLM
from autoglm.losses import IGNORE_INDEX
from autoglm.training import TrainConfig
from autoglm.recipes.finetune import FinetuneConfig, LoraSpec, finetune
from autoglm.training.lora import apply_lora, load_lora, lora_config, merge_lora, resolve_targets, trainable_parameters
from autoglm.training.sft_data import SFTDataset, encode_pair, encode_sft, read_sft_jsonl

from helpers import make_model_dir, make_tokenizer, write_text


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return OpenAutoGLMForCausalLM(OpenAutoGLMConfig.from_name("tiny", **kw))


def randomize_lora(model, seed=3):
    """LoRA B starts at zero (a no-op adapter); give every LoRA weight random values so the
    adapter changes the output and merge tests can fail."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_default_config_and_trainable_fraction():
    cfg = lora_config()
    assert (cfg.r, cfg.lora_alpha, sorted(cfg.target_modules), cfg.lora_dropout, str(cfg.task_type)) == (
        8, 16, ["q_proj", "v_proj"], 0.05, "CAUSAL_LM")
    model = apply_lora(tiny())
    n_train, n_total = trainable_parameters(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert all(("q_proj" in n or "v_proj" in n) for n in names)
    # per layer: q (64->64) and v (64->32) each get A (8 x 64) and B (out x 8)
    assert n_train == 2 * ((8 * 64 + 64 * 8) + (8 * 64 + 32 * 8))


def test_target_that_matches_nothing_is_an_error_even_next_to_a_valid_one():
    model = tiny()
    with pytest.raises(ValueError, match="'v_prj' matches no linear layer"):
        resolve_targets(model, ["q_proj", "v_prj"])
    with pytest.raises(ValueError, match="v_prj"):
        apply_lora(tiny(), lora_config(["q_proj", "v_prj"]))
    with pytest.raises(ValueError, match="no MoE experts"):
        resolve_targets(tiny(num_experts=0), ["experts"])
    experts = resolve_targets(model, ["experts", "o_proj"])
    assert "o_proj" in experts and all(".experts." in n for n in experts if n != "o_proj")
    assert len(experts) == 1 + 2 * 4 * 3  # 2 layers x 4 experts x (gate, up, down)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_merged_logits_equal_unmerged_peft_logits(dtype, tol):
    model = apply_lora(tiny().to(dtype), lora_config(["q_proj", "v_proj", "o_proj", "experts"]))
    randomize_lora(model)
    model = model.to(dtype).eval()
    x = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        base = model.get_base_model()
        with model.disable_adapter():
            plain = base(x).logits.float()
        unmerged = model(x).logits.float()
        merged_model = model.merge_and_unload()
        assert type(merged_model) is OpenAutoGLMForCausalLM
        merged = merged_model(x).logits.float()
    assert (unmerged - plain).abs().max() > 0.1  # the adapter matters
    torch.testing.assert_close(merged, unmerged, rtol=tol, atol=tol)


def test_encode_pair_and_jsonl_errors(tmp_path):
    assert encode_pair([5, 6, 7], [8], eos_id=0) == ([5, 6, 7, 8], [-100, -100, 8, 0])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "only a prompt"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2 has no 'completion' field"):
        read_sft_jsonl(bad)
    bad.write_text('{"completion": "b"}\n')
    with pytest.raises(ValueError, match=r":1 has no 'prompt' field"):
        read_sft_jsonl(bad)
    bad.write_text('not json\n')
    with pytest.raises(ValueError, match="not valid JSON"):
        read_sft_jsonl(bad)


def test_loss_is_on_completion_tokens_only(tmp_path):
    tok = make_tokenizer(tmp_path / "tok")
    recs = [{"prompt": "To be, or not", "completion": " to be"}, {"prompt": "the question", "completion": ": whether"}]
    ds = SFTDataset(encode_sft(recs, tok, max_len=64), tok.pad_token_id)
    x, y = ds.collate([0, 1])
    for row, rec in enumerate(recs):
        p = tok(rec["prompt"], add_special_tokens=False).input_ids
        c = tok(rec["completion"], add_special_tokens=False).input_ids
        labelled = [int(v) for v in y[row] if v != IGNORE_INDEX]
        assert labelled == c + [tok.eos_token_id]  # exactly the completion and the closing EOS
        assert x[row, :len(p)].tolist() == p
    # the objective's loss equals cross-entropy over completion positions only, by hand
    model = tiny(vocab_size=len(tok)).eval()
    from autoglm.training import CausalLMObjective
    with torch.no_grad():
        loss = CausalLMObjective()(model, (x, y))["lm_loss"]
        logp = model(x).logits.log_softmax(-1)
    terms = [-logp[b, t, y[b, t]] for b in range(2) for t in range(x.shape[1]) if y[b, t] != IGNORE_INDEX]
    torch.testing.assert_close(loss, torch.stack(terms).mean(), rtol=1e-5, atol=1e-6)


def run_finetune(base, data, out, train, lora=True, targets=("q_proj", "v_proj"), resume=False, **kw):
    """The fine-tuning recipe, as `autoglm finetune` calls it; returns (model, result, info)."""
    cfg = FinetuneConfig(base=base, data=data, out=out, train=train, lora=LoraSpec(enabled=lora, targets=targets),
                         resume=resume, **kw)
    o = finetune(cfg, progress=False)
    return o.model, o.result, o.info


def test_finetune_lora_saves_adapter_only_and_merge_matches(tmp_path):
    make_tokenizer(tmp_path / "tok")
    base = make_model_dir(tmp_path / "base", tmp_path / "tok")
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q{i}: to be", "completion": " or not to be."}) + "\n"
                            for i in range(20)))
    cfg = TrainConfig(batch_size=4, seq_len=32, max_steps=8, warmup_steps=1, lr=1e-2, eval_every=0,
                      save_every=0, log_every=4)
    model, result, info = run_finetune(base, data, tmp_path / "ad", cfg, lora=True)
    assert info["eval_after"]["loss"] < info["eval_before"]["loss"]
    files = sorted(p.name for p in (tmp_path / "ad").iterdir())
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files
    assert (tmp_path / "ad" / "adapter_model.safetensors").stat().st_size < 0.2 * (base / "model.safetensors").stat().st_size
    merged = merge_lora(tmp_path / "ad", tmp_path / "merged")
    # the merged run names the fine-tuning data (INT8 static calibration reads it from run.json)
    assert json.loads((tmp_path / "merged" / "run.json").read_text())["data"] == str(data.resolve())
    with pytest.raises(FileExistsError, match="--overwrite"):  # a saved model is not replaced unasked
        merge_lora(tmp_path / "ad", tmp_path / "merged")
    with pytest.raises(ValueError, match="input directory"):
        merge_lora(tmp_path / "ad", tmp_path / "ad")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()  # no PEFT needed
    peft_model = load_lora(tmp_path / "ad").eval()
    x = torch.randint(0, plain.config.vocab_size, (2, 16))
    with torch.no_grad():
        a, b = plain(x).logits, peft_model(x).logits
        original = AutoModelForCausalLM.from_pretrained(base)(x).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert (a - original).abs().max() > 1e-4  # the merged model is not just the base model
    assert merged is not None


def test_full_finetune_on_text_file(tmp_path):
    make_tokenizer(tmp_path / "tok")
    base = make_model_dir(tmp_path / "base", tmp_path / "tok")
    data = write_text(tmp_path / "d.txt")
    cfg = TrainConfig(batch_size=4, seq_len=32, max_steps=6, warmup_steps=1, eval_every=0, save_every=0,
                      eval_batches=2)
    _, _, info = run_finetune(base, data, tmp_path / "full", cfg, lora=False)
    assert info["trainable_params"] == info["total_params"]
    assert info["eval_after"]["loss"] < info["eval_before"]["loss"]
    assert (tmp_path / "full" / "model.safetensors").is_file()


def test_lora_resume_reproduces_the_uninterrupted_adapter(tmp_path):
    """A LoRA run checkpoints adapter + optimizer + scheduler + RNG + step; resuming from
    the step-2 checkpoint (as if the run had died after it) ends with exactly the adapter
    the uninterrupted run ended with (dropout 0.05 is on, so the RNG state matters too)."""
    import shutil

    from safetensors.torch import load_file

    from autoglm.training.checkpoint import CheckpointError

    make_tokenizer(tmp_path / "tok")
    base = make_model_dir(tmp_path / "base", tmp_path / "tok")
    data = write_text(tmp_path / "d.txt")
    cfg = TrainConfig(batch_size=2, seq_len=32, max_steps=6, warmup_steps=2, lr=1e-2, eval_every=0, save_every=2,
                      keep_checkpoints=5, eval_batches=1, log_every=2)
    kw = dict(lora=True, cache_dir=tmp_path / "cache", targets=("q_proj", "v_proj", "o_proj"))
    run_finetune(base, data, tmp_path / "a", cfg, **kw)
    ckpts = sorted(p.name for p in (tmp_path / "a" / "checkpoints").glob("step-*"))
    assert ckpts == ["step-000002", "step-000004", "step-000006"]
    step2 = tmp_path / "a" / "checkpoints" / "step-000002"
    assert {"adapter_model.safetensors", "optimizer.pt", "rng.pt", "trainer_state.json"} <= {
        p.name for p in step2.iterdir()} and not (step2 / "model.safetensors").exists()
    # the "interrupted" run: only the step-2 checkpoint survived
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copytree(step2, tmp_path / "b" / "checkpoints" / "step-000002")
    (tmp_path / "b" / "checkpoints" / "latest").write_text("step-000002\n")
    with pytest.raises(ValueError, match="resume=True"):  # a fresh start over a checkpoint is refused
        run_finetune(base, data, tmp_path / "b", cfg, **kw)
    _, result, _ = run_finetune(base, data, tmp_path / "b", cfg, resume=True, **kw)
    assert result.steps == 6 and result.steps_run == 4
    a, b = load_file(tmp_path / "a" / "adapter_model.safetensors"), load_file(tmp_path / "b" / "adapter_model.safetensors")
    s2 = load_file(step2 / "adapter_model.safetensors")
    assert a.keys() == b.keys() and any("o_proj" in k for k in a)
    assert any(not torch.equal(a[k], s2[k]) for k in a)  # steps 3-6 changed the adapter
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # resuming with other LoRA targets is refused, naming the mismatch
    with pytest.raises(CheckpointError, match="does not match the model's adapter"):
        run_finetune(base, data, tmp_path / "b", cfg, resume=True, **{**kw, "targets": ("q_proj",)})
