"""lm-evaluation-harness on a loaded model, in process (`autoglm eval RUN --tasks ...`).

The model goes to lm-eval's own HF backend (`HFLM(pretrained=model, tokenizer=tok)`): our
model is a transformers `PreTrainedModel` (`import autoglm` registers the Auto* classes),
so the harness scores it exactly as it scores any causal LM, with the run's tokenizer. The
built-in tasks (`tasks.py`) are always on the task path; `include_path` adds a folder of
the user's own task YAML. Nothing is downloaded for local tasks (JSON data files).

`per_sample_loglikelihoods(results)` pulls each example's scores out of a result with
samples, the numbers the server test compares against `local-completions`.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from .tasks import resolve_task_names, write_builtin_tasks

__all__ = ["run_harness", "summarize", "per_sample_loglikelihoods", "lm_eval_version"]

log = logging.getLogger(__name__)


def _require_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ImportError("lm-evaluation-harness is not installed; install the eval extra: "
                          "pip install 'autoglm[eval]'") from None
    return lm_eval


def lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def run_harness(model, tokenizer, tasks: list[str] | tuple[str, ...], include_path: str | Path | None = None,
                batch_size: int = 8, limit: int | None = None, num_fewshot: int | None = None,
                log_samples: bool = True, lm=None) -> dict[str, Any]:
    """lm_eval.simple_evaluate on `model` (HF backend, CPU or the model's device) or on an
    lm-eval `lm` given instead (e.g. lm-eval's `local-completions` against a server).
    Returns lm-eval's result dict (with `samples` when `log_samples`)."""
    lm_eval = _require_lm_eval()
    from lm_eval.tasks import TaskManager

    names = resolve_task_names(tasks)
    if not names:
        raise ValueError("no tasks given; name lm-eval tasks, e.g. --tasks builtin or --tasks autoglm_docstring_mc")
    with tempfile.TemporaryDirectory(prefix="autoglm-tasks-") as tmp:
        paths = [str(write_builtin_tasks(tmp))] + ([str(include_path)] if include_path is not None else [])
        # indexing lm-eval's own catalogue (~15k task files) takes seconds: only when a task needs it
        manager = TaskManager(include_path=paths, include_defaults=False)
        if any(n not in manager.all_tasks for n in names):
            manager = TaskManager(include_path=paths)
        unknown = [n for n in names if n not in manager.all_tasks]
        if unknown:
            raise ValueError(f"unknown lm-eval task(s) {unknown}; built-in: builtin, "
                             f"{', '.join(sorted(n for n in manager.all_tasks if n.startswith('autoglm_')))}; "
                             f"add your own task YAML with --include-path DIR")
        if lm is None:
            from lm_eval.models.huggingface import HFLM

            device = str(next(model.parameters()).device)
            lm = HFLM(pretrained=model.eval(), tokenizer=tokenizer, batch_size=batch_size, device=device,
                      max_length=model.config.max_position_embeddings)
        res = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit,
                                      num_fewshot=num_fewshot, log_samples=log_samples, bootstrap_iters=0)
    if res is None:  # only on non-zero ranks of a distributed run
        raise RuntimeError("lm-eval returned no results")
    return res


def summarize(res: dict[str, Any], samples: bool = False) -> dict[str, Any]:
    """The JSON-safe part of a result worth keeping: metrics per task, sample counts, task
    configs and versions, the lm-eval version, and (`samples`) every example's record."""
    import json

    from lm_eval.utils import handle_non_serializable

    keep = {k: res.get(k) for k in ("results", "n-samples", "versions", "configs", "higher_is_better")}
    keep["lm_eval_version"] = lm_eval_version()
    if samples:
        keep["samples"] = res.get("samples")
    return json.loads(json.dumps(keep, default=handle_non_serializable))


def per_sample_loglikelihoods(res: dict[str, Any]) -> dict[str, dict[int, list[float]]]:
    """task -> doc_id -> the loglikelihood of each of its requests (multiple-choice tasks: one per choice)."""
    out: dict[str, dict[int, list[float]]] = {}
    for task, samples in (res.get("samples") or {}).items():
        for s in samples:
            resps = s.get("filtered_resps") or []
            if resps and isinstance(resps[0], (list, tuple)) and resps[0] and isinstance(resps[0][0], float):
                out.setdefault(task, {})[s["doc_id"]] = [float(r[0]) for r in resps]
    return out
