"""The built-in lm-evaluation-harness tasks, made from the built-in corpus (the standard
library's docstrings), so an evaluation runs with no download.

* `autoglm_docstring_mc` (multiple choice, lm-eval's loglikelihood requests): the first
  words of a docstring's summary line, and four endings: its own and three taken from
  other docstrings; metrics acc and acc_norm.
* `autoglm_docstring_gen` (generate-until): the first words of a summary line, greedy
  continuation up to the end of the line (or 16 tokens); metric exact_match.

The examples are JSONL files shipped with the package (`data/`), made once by
`make_builtin_examples(stdlib_docstring_corpus())`: shipping them keeps every machine (and
every Python version, whose standard library differs) on the same examples. The task YAML
needs absolute data paths, so `write_builtin_tasks(folder)` writes it at run time into a
folder that lm-eval's `TaskManager(include_path=...)` reads. `BUILTIN_TASKS` names them;
`builtin` on the command line means both.

Example:
    >>> ex = make_builtin_examples(["Return the sum of the two numbers given as arguments.",
    ...                             "Open the file and read every line into a list of strings.",
    ...                             "Close the connection to the server after the last request.",
    ...                             "Parse a date string in ISO format and return a date object."],
    ...                            n_mc=1, n_gen=1, seed=0)
    >>> sorted(ex), len(ex["mc"][0]["choices"]), sorted(ex["gen"][0])
    (['gen', 'mc'], 4, ['context', 'target'])
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

__all__ = ["BUILTIN_TASKS", "DATA_DIR", "make_builtin_examples", "write_builtin_examples", "write_builtin_tasks",
           "resolve_task_names"]

DATA_DIR = Path(__file__).parent / "data"
BUILTIN_TASKS = {"autoglm_docstring_mc": "docstring_mc.jsonl", "autoglm_docstring_gen": "docstring_gen.jsonl"}
_WORD_LINE = re.compile(r"^[A-Za-z][A-Za-z0-9 ,'()_-]*[A-Za-z0-9)]\.?$")


def _summary_lines(docs: list[str]) -> list[list[str]]:
    """First lines of the docstrings that read as a plain sentence of 7 to 14 words, as words."""
    out, seen = [], set()
    for d in docs:
        line = d.strip().split("\n", 1)[0].strip()
        words = line.split()
        if 7 <= len(words) <= 14 and _WORD_LINE.match(line) and line not in seen:
            seen.add(line)
            out.append(words)
    return out


def make_builtin_examples(docs: list[str], n_mc: int = 120, n_gen: int = 60, seed: int = 0) -> dict[str, list]:
    """{"mc": [{context, choices, label}], "gen": [{context, target}]} from docstrings: each
    example cuts one summary line after about half its words; a multiple-choice example's
    wrong endings are the endings of three other lines (no two examples share a line)."""
    lines = _summary_lines(docs)
    rng = random.Random(seed)
    rng.shuffle(lines)
    if len(lines) < 4:
        raise ValueError(f"only {len(lines)} usable docstring summary lines; need at least 4")

    def split(words):
        k = len(words) // 2
        return " ".join(words[:k]), " ".join(words[k:])

    pairs = [split(w) for w in lines]
    mc_pairs, gen_pairs = pairs[:n_mc], pairs[n_mc:n_mc + n_gen]
    mc = []
    for i, (ctx, end) in enumerate(mc_pairs):
        others = [e for j, (_, e) in enumerate(pairs) if j != i and e != end]
        choices = rng.sample(others, 3) + [end]
        rng.shuffle(choices)
        mc.append({"context": ctx, "choices": choices, "label": choices.index(end)})
    gen = [{"context": ctx, "target": end} for ctx, end in gen_pairs]
    return {"mc": mc, "gen": gen}


def write_builtin_examples(examples: dict[str, list], folder: Path = DATA_DIR) -> None:
    """Write the examples as the JSONL files the tasks read (how `data/` was made)."""
    from ..atomic import atomic_write_text

    for key, name in zip(("mc", "gen"), BUILTIN_TASKS.values()):
        atomic_write_text(Path(folder) / name, "".join(json.dumps(e) + "\n" for e in examples[key]))


def _yaml(task: str, data: Path, body: str) -> str:
    return (f"task: {task}\n"
            f"dataset_path: json\n"
            f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
            f"test_split: test\n" + body)


_MC = """output_type: multiple_choice
doc_to_text: "{{context}}"
doc_to_choice: "{{choices}}"
doc_to_target: label
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

_GEN = """output_type: generate_until
doc_to_text: "{{context}}"
doc_to_target: "{{target}}"
target_delimiter: " "
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 16
  do_sample: false
  temperature: 0.0
filter_list:
  - name: strip
    filter:
      - function: regex
        regex_pattern: "(.*)"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: true
metadata:
  version: 1.0
"""


def write_builtin_tasks(folder: str | Path, data_dir: Path = DATA_DIR) -> Path:
    """Write the built-in tasks' YAML (pointing at the shipped JSONL) into `folder`; returns it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for (task, data), body in zip(BUILTIN_TASKS.items(), (_MC, _GEN)):
        path = (Path(data_dir) / data).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"built-in task data {path} is missing; reinstall autoglm")
        (folder / f"{task}.yaml").write_text(_yaml(task, path, body))
    return folder


def resolve_task_names(tasks: list[str] | tuple[str, ...]) -> list[str]:
    """Task names as given, with `builtin` standing for every built-in task."""
    out: list[str] = []
    for t in tasks:
        for name in (list(BUILTIN_TASKS) if t == "builtin" else [t]):
            if name not in out:
                out.append(name)
    return out
