"""`autoglm eval RUN --tasks ...`: lm-eval in process on the run's model; the per-example
loglikelihoods it reports are the model's own teacher-forced scores (a full forward)."""

import json

import pytest
import torch
from typer.testing import CliRunner

from autoglm.cli import app

pytest.importorskip("lm_eval")


def run(*args):
    res = CliRunner().invoke(app, [str(a) for a in args])
    return res.exit_code, res.output


def test_cli_eval_tasks_writes_results_next_to_the_run(run_dir):
    from autoglm.evaluation.harness import per_sample_loglikelihoods
    from autoglm.rundir import RunDir

    code, out = run("eval", run_dir, "--tasks", "builtin", "--limit", "4", "--batch-size", "3", "--log-samples")
    assert code == 0, out
    assert "autoglm_docstring_mc" in out and "acc" in out and "lm_eval.json" in " ".join(out.split())
    res = json.loads((run_dir / "lm_eval.json").read_text())
    assert set(res["results"]) == {"autoglm_docstring_mc", "autoglm_docstring_gen"}
    assert 0 <= res["results"]["autoglm_docstring_mc"]["acc,none"] <= 1
    assert "exact_match,strip" in res["results"]["autoglm_docstring_gen"] and res["lm_eval_version"]
    # each choice's loglikelihood: sum of log p(continuation token | context + earlier tokens)
    model, tok = RunDir.open(run_dir).load()
    lls = per_sample_loglikelihoods(res)["autoglm_docstring_mc"]
    checked = 0
    for s in res["samples"]["autoglm_docstring_mc"][:2]:
        for (ctx, cont), ll in zip(s["arguments"], lls[s["doc_id"]]):  # one (context, choice) per request
            whole, c = tok(ctx + cont).input_ids, tok(ctx).input_ids
            with torch.no_grad():
                lp = model(torch.tensor([whole])).logits[0].float().log_softmax(-1)
            ref = sum(float(lp[i - 1, whole[i]]) for i in range(len(c), len(whole)))
            assert ll == pytest.approx(ref, abs=1e-4)
            checked += 1
    assert checked == 8


@pytest.mark.slow  # an unknown name makes lm-eval index its whole catalogue (~15 s)
def test_unknown_task_is_a_clear_error(run_dir):
    code, out = run("eval", run_dir, "--tasks", "no_such_task", "--output", run_dir / "x.json")
    assert code == 2 and "no_such_task" in out and "--include-path" in " ".join(out.split())
