"""Image prefixes: the engine's `Request.prefix_embeds` against a full-recompute greedy loop with
the embedding hook, under chunked prefill and continuous batching; the projector adapter."""

import pytest
import torch

from autoglm.adapters import load_adapter, save_adapter
from autoglm.config import OpenAutoGLMConfig
from autoglm.hf import OpenAutoGLMForCausalLM
from autoglm.inference import EngineConfig, LLMEngine, SamplingParams
from autoglm.multimodal.projector import ImagePrefixProjector, image_prefix, names_digit

from .helpers import tiny_image_cfg


def _greedy_reference(lm, ids, prefix, n):
    seq = list(ids)
    for _ in range(n):
        with torch.no_grad(), image_prefix(lm, prefix[None]):
            logits = lm(torch.tensor([seq])).logits[0, -1]
        seq.append(int(logits.argmax()))
    return seq[len(ids):]


@pytest.mark.parametrize("chunk", [512, 3])
def test_engine_prefix_equals_embedding_hook(chunk):
    torch.manual_seed(0)
    lm = OpenAutoGLMForCausalLM(OpenAutoGLMConfig.from_name("tiny", vocab_size=300)).eval()
    prompts = [[1, 1, 1, 1, 50, 60], [1, 1, 1, 1, 70]]
    prefixes = [torch.randn(4, 64) * 2, torch.randn(4, 64) * 2]
    engine = LLMEngine(lm, None, EngineConfig(block_size=4, num_blocks=64, max_num_batched_tokens=chunk))
    rids = []
    for ids, pe in zip(prompts, prefixes):  # chunk 3: the prefix spans two prefill chunks
        rid = engine.add_request(ids, SamplingParams(max_tokens=6, temperature=0.0, prompt_logprobs=0))
        engine.core.requests[rid].prefix_embeds = pe
        rids.append(rid)
    reqs = [engine.core.requests[r] for r in rids]
    while engine.has_unfinished():
        engine.step()
    for r, ids, pe in zip(reqs, prompts, prefixes):
        assert r.output_ids == _greedy_reference(lm, ids, pe, 6)
        with torch.no_grad(), image_prefix(lm, pe[None]):  # every prompt position's log-probabilities
            ref = lm(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        want = [float(ref[i, ids[i + 1]]) for i in range(len(ids) - 1)]
        assert [lp.logprob for lp in r.prompt_logprobs] == pytest.approx(want, abs=1e-4)
        with torch.no_grad():  # and they are not those of the bare placeholders
            bare = lm(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        assert abs(float(bare[len(ids) - 2, ids[-1]]) - want[-1]) > 1e-3


def test_projector_is_a_registered_adapter_with_a_frozen_encoder(tmp_path):
    p = ImagePrefixProjector(tiny_image_cfg().to_dict(), embed_dim=16, lm_hidden=64, prefix_tokens=2, hidden=32)
    x = torch.rand(3, 1, 8, 8)
    out = p(x)
    assert out.shape == (3, 2, 64)
    out.sum().backward()
    assert p.image_encoder.patch_embed.weight.grad is None and p.mlp[0].weight.grad is not None
    q = load_adapter(save_adapter(p, tmp_path / "image"))
    assert isinstance(q, ImagePrefixProjector) and torch.allclose(q(x), p(x))


def test_names_digit():
    assert names_digit("a handwritten seven", 7) and names_digit("the number 7", 7)
    assert not names_digit("a handwritten seven or 1", 7) and not names_digit("a photo of", 3)
    assert not names_digit("the number 17", 7)


def test_names_class_for_user_classes():
    from autoglm.multimodal.data import DIGIT_NAMES
    from autoglm.multimodal.projector import names_class

    names = ["red", "green", "dark red"]
    assert names_class("A red square.", 0, names) and not names_class("a reddish square", 0, names)
    assert names_class("a dark red square", 2, names) and not names_class("a dark red square", 0, names)
    assert not names_class("red and green", 0, names)  # two classes named
    assert names_class("the number 7", 7, DIGIT_NAMES) and not names_class("the number 7", 7, names)
