"""The fixed-shape decode path used for CUDA graphs (bucketed batch, padded keys, scratch
slot for padding rows), run eagerly on CPU: greedy tokens equal HF generate, and the
padding rows never touch a real KV block. On a GPU the same path is captured and replayed."""

import pytest
import torch

from autoglm.inference import EngineConfig, LLMEngine, SamplingParams
from autoglm.inference.cuda_graph import CUDAGraphDecoder, DecodeGraphOptions, max_decode_keys

from inference_helpers import make_model, prompts
from test_engine import hf_greedy


@pytest.mark.parametrize("preset", ["tiny", "standard-tiny"])
def test_bucketed_decode_matches_hf(preset):
    model = make_model(preset, window_size=16) if preset == "tiny" else make_model(preset)
    ps = prompts(5, 3, 40, seed=3)
    n_out = [7, 30, 12, 45, 3]
    # the runner builds its fixed-shape decoder; capture off runs it eagerly on CPU
    eng = LLMEngine(model, config=EngineConfig(block_size=4, num_blocks=400, max_num_batched_tokens=32,
                                               cuda_graphs=True, cuda_graph_capture=False,
                                               cuda_graph_batch_sizes=(1, 2, 4)))  # 5 rows: eager; <= 4: bucketed
    dec = eng.runner.graphs
    reqs = eng.generate(ps, [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in n_out])
    for p, n, r in zip(ps, n_out, reqs):
        assert r.output_ids == hf_greedy(model, p, n)
    assert set(dec.buckets) >= {1, 2, 4}  # odd batch sizes padded up to a bucket were exercised
    assert eng.pool.num_free == eng.pool.num_blocks


def test_sparse_key_bound_holds_while_generating_long():
    model = make_model("tiny", window_size=8, num_global_tokens=2)
    eng = LLMEngine(model, config=EngineConfig(block_size=4, num_blocks=64, cuda_graphs=True, cuda_graph_capture=False,
                                               cuda_graph_batch_sizes=(1,)))
    dec = eng.runner.graphs
    ids = prompts(1, 5, 6)[0]
    (req,) = eng.generate([ids], SamplingParams(max_tokens=120, temperature=0, ignore_eos=True))
    assert req.output_ids == hf_greedy(model, ids, 120)
    assert dec.max_keys == max_decode_keys(model.config, model.config.max_position_embeddings) == 10  # 2 + 8
    # every decode step (all but the prefill step) fitted the fixed key budget
    assert dec.steps == eng.stats.decode_steps == 119


def test_capture_needs_cuda():
    model = make_model("tiny")
    with pytest.raises(ValueError, match="CUDA"):
        LLMEngine(model, config=EngineConfig(block_size=4, num_blocks=16, cuda_graphs=True))
    eng = LLMEngine(model, config=EngineConfig(block_size=4, num_blocks=16))
    assert eng.runner.graphs is None  # on CPU by default: no fixed-shape decoder
    with pytest.raises(ValueError, match="batch size"):
        DecodeGraphOptions(batch_sizes=())
    assert isinstance(LLMEngine(model, config=EngineConfig(block_size=4, num_blocks=16, cuda_graphs=True,
                                                           cuda_graph_capture=False)).runner.graphs, CUDAGraphDecoder)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("preset", ["tiny", "standard-tiny"])
def test_captured_graphs_match_hf_on_cuda(preset):
    model = make_model(preset).cuda()
    ps = prompts(6, 3, 40, seed=4)
    n_out = [20, 5, 33, 12, 40, 9]
    eng = LLMEngine(model, config=EngineConfig(block_size=4, num_blocks=400, cuda_graph_batch_sizes=(1, 2, 4, 8)))
    reqs = eng.generate(ps, [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in n_out])
    for p, n, r in zip(ps, n_out, reqs):
        out = model.generate(torch.tensor([p], device="cuda"), max_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=1)
        assert r.output_ids == out[0, len(p):].tolist()
    assert eng.runner.graphs.replays > 0
    assert eng.pool.num_free == eng.pool.num_blocks
