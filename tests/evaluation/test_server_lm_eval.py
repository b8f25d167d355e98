"""lm-evaluation-harness against the real server, as a user runs it: `local-completions` with
its default tokenized requests (batches of token-id prompts; `echo` + `logprobs` +
`max_tokens` 1 to score, greedy generation with stop strings) on the built-in tasks. No
request may fail, and every example's loglikelihoods must equal those of `autoglm eval`'s
in-process run (lm-eval's HF backend on the same model) within 1e-4."""

import pytest

from inference_helpers import BackgroundServer

pytest.importorskip("lm_eval")

LIMIT = 12  # examples per task: 48 scored choices, 12 generations


def test_local_completions_against_the_server_equals_in_process(run_dir):
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from autoglm.evaluation.harness import per_sample_loglikelihoods, run_harness
    from autoglm.recipes.serve import ServeConfig, build_server
    from autoglm.rundir import RunDir
    from autoglm.settings import load_config

    model, tok = RunDir.open(run_dir).load()
    ctx = model.config.max_position_embeddings
    # a 32-token step budget: longer prompts are scored across chunks
    cfg = load_config(ServeConfig, overrides={"run": run_dir, "served_model_name": "tiny", "engine.num_blocks": 256,
                                              "engine.max_num_batched_tokens": 32})
    app, _ = build_server(cfg)
    with BackgroundServer(app) as url:
        lm = LocalCompletionsAPI(base_url=url + "/v1/completions", model="tiny", tokenizer_backend="huggingface",
                                 tokenizer=str(run_dir), max_length=ctx, batch_size=4, max_retries=1)
        served = run_harness(None, tok, ["builtin"], limit=LIMIT, lm=lm)
    local = run_harness(model, tok, ["builtin"], limit=LIMIT, batch_size=4)

    a, b = per_sample_loglikelihoods(served), per_sample_loglikelihoods(local)
    mc = "autoglm_docstring_mc"
    assert sorted(a[mc]) == sorted(b[mc]) == list(range(LIMIT))
    for doc in range(LIMIT):
        assert a[mc][doc] == pytest.approx(b[mc][doc], abs=1e-4), doc
    assert served["results"][mc]["acc,none"] == local["results"][mc]["acc,none"]
    gen = {s["doc_id"]: s["filtered_resps"][0] for s in served["samples"]["autoglm_docstring_gen"]}
    ref = {s["doc_id"]: s["filtered_resps"][0] for s in local["samples"]["autoglm_docstring_gen"]}
    assert len(gen) == LIMIT and all(isinstance(t, str) for t in gen.values())
    assert gen == ref  # greedy continuations up to the newline: the same text both ways
