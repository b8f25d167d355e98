"""How often a trained early exit drafts the full model's greedy token: the first draft's
acceptance in self-speculative decoding, measured without the engine.

For each run: greedy continuations (HF `generate()`, `--new-tokens`) of validation prompts
from the run's held-out text (the first half, as `decode.py --speculative-run` chooses its
settings on), then one forward over prompt + continuation with every layer's hidden state;
the agreement of exit l is the share of continuation positions where the argmax of the
shared head on layer l's output equals the full model's. Also the same on the held-out text
itself (teacher-forced), where the context is the text's and not the model's own.

    python benchmarks/exit_agreement.py runs/spec-ee runs/spec-ee2 runs/spec-sd

Writes docs/results/exit-agreement.{json,md} (--name, --out to change).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from decode import held_out_prompts
from results_io import save_results


def agreement(run_dir: Path, prompts: int, prompt_len: int, new_tokens: int, text_len: int) -> dict:
    from autoglm.rundir import RunDir

    run = RunDir.open(run_dir)
    model, tok = run.load()
    model.eval()
    L = model.config.num_hidden_layers
    val, _ = held_out_prompts(run, tok, prompt_len + text_len, prompts, 0)
    ids = torch.tensor([p[:prompt_len] for p in val])
    text = torch.tensor(val)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                             pad_token_id=model.config.pad_token_id)

        def per_layer(seq, lo):
            o = model(seq, output_hidden_states=True)
            full = o.logits[:, lo:].argmax(-1)
            return {l: float((model.exit_logits(o.hidden_states[l])[:, lo:].argmax(-1) == full).float().mean())
                    for l in range(1, L)}

        gen = per_layer(out[:, :-1], prompt_len - 1)
        forced = per_layer(text, 0)
    info = run.info.get("early_exit") or {}
    steps = (run.info.get("config") or {}).get("train", {}).get("max_steps")
    return {"run": str(run_dir), "layers": L, "trained_exits": info.get("layers"), "exit_weight": info.get("weight"),
            "exit_target": info.get("target", "labels"), "steps": steps,
            "generated": gen, "text": forced, "positions": int(out[:, prompt_len:].numel())}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="run directories trained with early exits")
    p.add_argument("--prompts", type=int, default=8, help="validation prompts per run")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=48, help="greedy tokens generated per prompt")
    p.add_argument("--text-len", type=int, default=48, help="held-out tokens after each prompt (teacher-forced)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default="exit-agreement")
    p.add_argument("--out", type=Path, default=None, help="results folder (default: docs/results)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    rows = [agreement(r, a.prompts, a.prompt_len, a.new_tokens, a.text_len) for r in a.runs]
    L = max(r["layers"] for r in rows)
    head = " | ".join(f"exit {l}" for l in range(1, L))
    md = [f"Greedy agreement of each exit's argmax with the full model's: on the model's own greedy continuations "
          f"({a.new_tokens} tokens after each of {a.prompts} {a.prompt_len}-token validation prompts from the run's "
          f"held-out text; the first draft's acceptance in self-speculative decoding) and, after the slash, on the "
          f"held-out text itself (teacher-forced). Exits that were not trained read the shared head all the same.",
          "", f"| run | second phase | trained exits | {head} |", "|---|---|---|" + "---|" * (L - 1)]
    for r in rows:
        cells = " | ".join(f"{100 * r['generated'][l]:.1f}% / {100 * r['text'][l]:.1f}%" if l in r["generated"]
                           else "" for l in range(1, L))
        phase = f"{r['steps']} steps, weight {r['exit_weight']}, target {r['exit_target']}"
        md.append(f"| `{r['run']}` | {phase} | {r['trained_exits']} | {cells} |")
    save_results(a.out, a.name, {"runs": rows}, "\n".join(md))


if __name__ == "__main__":
    main()
