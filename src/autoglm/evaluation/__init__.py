"""Evaluation with lm-evaluation-harness: the built-in local tasks and the in-process runner
(`autoglm eval RUN --tasks ...`). lm-eval is the optional `eval` extra; this package
imports it only when a harness run starts."""

from .tasks import BUILTIN_TASKS, make_builtin_examples, resolve_task_names, write_builtin_tasks

__all__ = ["BUILTIN_TASKS", "make_builtin_examples", "resolve_task_names", "write_builtin_tasks"]
