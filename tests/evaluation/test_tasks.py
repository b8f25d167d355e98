"""The built-in lm-eval tasks: well-formed examples shipped with the package, task YAML that
lm-eval's TaskManager reads without lm-eval's own catalogue or a download."""

import json

import pytest

from autoglm.evaluation.tasks import BUILTIN_TASKS, DATA_DIR, resolve_task_names, write_builtin_tasks


def test_shipped_examples_are_well_formed():
    mc = [json.loads(line) for line in (DATA_DIR / BUILTIN_TASKS["autoglm_docstring_mc"]).read_text().splitlines()]
    gen = [json.loads(line) for line in (DATA_DIR / BUILTIN_TASKS["autoglm_docstring_gen"]).read_text().splitlines()]
    assert len(mc) == 120 and len(gen) == 60
    for e in mc:
        assert len(e["choices"]) == 4 == len(set(e["choices"])) and 0 <= e["label"] < 4 and e["context"]
    assert all(e["context"] and e["target"] for e in gen)


def test_task_yaml_loads_in_lm_eval(tmp_path):
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(write_builtin_tasks(tmp_path)), include_defaults=False)
    assert set(BUILTIN_TASKS) <= set(manager.all_tasks)
    assert resolve_task_names(["builtin", "autoglm_docstring_mc", "x"]) == [*BUILTIN_TASKS, "x"]
