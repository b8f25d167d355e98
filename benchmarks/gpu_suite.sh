#!/usr/bin/env bash
# Every GPU figure the project reports, in one run of a few minutes (one H200: about 5 min).
#
#   bash benchmarks/gpu_suite.sh            # results to docs/results/ (or to $OUT when set)
#   PYTHON=.venv/bin/python STAGES="check arch" bash benchmarks/gpu_suite.sh
#
# The stages' own timeouts add up to more than ten minutes: where one command may not run that
# long, run it in two: STAGES="check arch compile", then STAGES="decode moe spec".
#
# Stages (STAGES, default all, in this order):
#   check    - CUDA correctness of the fast paths before timing them: bf16 grouped-GEMM MoE
#              (forward and gradients) against the sorted loop, FlexAttention against dense
#              attention, and whether the model forward compiles without a graph break.
#   arch     - benchmarks/architecture.py --speed on `base`: base, standard-base, transformers'
#              Llama and Mixtral at the same size; forward latency at 512/2048/8192, training
#              tokens/s and MFU, peak memory, which grouped GEMM ran (eager, bf16).
#   compile  - the same for base and standard-base with torch.compile on every model.
#   decode   - benchmarks/decode.py on `base`, batch 1 and 32: HF generate on the same model (dynamic and
#              static cache, eager), transformers' Llama and Mixtral of the same size (eager and static
#              cache + torch.compile, HF's best),
#              the engine eager, with CUDA graphs, and with CUDA graphs + torch.compile (bf16).
#   moe      - benchmarks/moe_dispatch.py on `base`'s MoE layer (bf16): sorted loop, grouped GEMM, weight
#              gather and dense, from 1 to 4096 tokens: which dispatch `auto` should pick per size.
#   spec     - self-speculative decoding of a trained early-exit run (SPEC_RUN, default runs/spec-ee2,
#              carried to the machine; skipped when absent): speed-up over plain decoding at batch 1,
#              tokens per step, identical greedy tokens (fp32, the dtype it was trained in).
# Further stages are appended below by the benchmarks that own them.
#
# Every result file records the torch version, GPU and commit (benchmarks/results_io.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT_DIR=${OUT:-docs/results}
STAGES=${STAGES:-check arch compile decode moe spec}
export PYTHONPATH="$PWD/src:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT_DIR"
has() { [[ " $STAGES " == *" $1 "* ]]; }

$PY - <<'EOF'
import torch, torch.nn.functional as F
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPU {torch.cuda.get_device_name(0)}, "
      f"grouped GEMM: {'torch.nn.functional.grouped_mm' if hasattr(F, 'grouped_mm') else 'torch._grouped_mm' if hasattr(torch, '_grouped_mm') else 'none'}")
EOF

if has check; then
  echo "== check: CUDA correctness of grouped-GEMM MoE and FlexAttention"
  timeout 300 $PY - <<'EOF'
import torch
from autoglm import OpenAutoGLMConfig, OpenAutoGLMForCausalLM
from autoglm.modules.moe import GROUPED_MM, MoEFeedForward
from autoglm.modules.attention import attend_dense, attend_flex

torch.manual_seed(0)
dev = "cuda"
a = MoEFeedForward(1024, 688, 8, 2, "sorted").to(dev)
b = MoEFeedForward(1024, 688, 8, 2, "grouped").to(dev)
b.load_state_dict(a.state_dict())
x = torch.randn(4096, 1024, device=dev)
g = torch.randn(4096, 1024, device=dev)
with torch.autocast("cuda", torch.bfloat16):
    ya, _ = a(x)
    yb, _ = b(x)
(ya.float() * g).sum().backward()
(yb.float() * g).sum().backward()
err = (ya.float() - yb.float()).abs().max().item() / ya.float().abs().max().item()
gerr = max((pa.grad - pb.grad).abs().max().item() / max(pa.grad.abs().max().item(), 1e-12)
           for pa, pb in zip(a.parameters(), b.parameters()) if pa.grad is not None)
print(f"MoE grouped ({GROUPED_MM}) vs sorted, bf16: max rel. output diff {err:.2e}, grad diff {gerr:.2e}",
      "OK" if err < 3e-2 and gerr < 5e-2 else "MISMATCH")
q = torch.randn(1, 16, 2048, 64, device=dev, dtype=torch.bfloat16)
k, v = torch.randn_like(q), torch.randn_like(q)
pos = torch.arange(2048, device=dev)[None]
ref = attend_dense(q, k, v, 256, 8, pos, pos)
out = attend_flex(q, k, v, 256, 8, 0)
ferr = (out.float() - ref.float()).abs().max().item()
print(f"FlexAttention (compiled, block mask) vs dense mask, bf16: max abs diff {ferr:.2e}", "OK" if ferr < 3e-2 else "MISMATCH")
model = OpenAutoGLMForCausalLM(OpenAutoGLMConfig.from_name("base", num_hidden_layers=2)).to(dev).train()
ids = torch.randint(2, 32000, (2, 1024), device=dev)
def step(ids):
    with torch.autocast("cuda", torch.bfloat16):
        return model(ids, labels=ids, use_cache=False).loss
torch._dynamo.reset()
ex = torch._dynamo.explain(step)(ids)
print(f"torch.compile of the training forward (flex + grouped GEMM): {ex.graph_count} graph(s), "
      f"{ex.graph_break_count} break(s)", [b.reason[:120] for b in ex.break_reasons])
EOF
fi

if has arch; then
  echo "== arch: base vs standard-base vs HF Llama / Mixtral (eager, bf16)"
  timeout 420 $PY benchmarks/architecture.py --speed --presets base --device cuda --precision bf16 \
    --lengths 512 2048 8192 --repeats 5 --train-batch 8 --train-seq 2048 --train-steps 5 --out "$OUT_DIR"
fi

if has compile; then
  echo "== compile: base vs standard-base, torch.compile"
  timeout 420 $PY benchmarks/architecture.py --speed --presets base --device cuda --precision bf16 --no-hf \
    --compile --lengths 512 2048 8192 --repeats 5 --train-batch 8 --train-seq 2048 --train-steps 5 \
    --out "$OUT_DIR" || echo "compile stage failed or timed out (see above)"
fi

if has decode; then
  echo "== decode: engine vs HF generate / Llama / Mixtral at batch 1 and 32 (bf16)"
  timeout 480 $PY benchmarks/decode.py --device cuda --dtype bf16 --presets base --forward-lens '' \
    --batches 1,32 --prompt-len 128 --new-tokens 64 --repeats 1 \
    --systems hf,hf-static,llama,llama-static-compile,mixtral,mixtral-static-compile,engine,engine-graphs,engine-graphs-compile \
    --name decode-gpu --out "$OUT_DIR" || echo "decode stage failed or timed out (see above)"
fi

if has moe; then
  echo "== moe: one MoE layer of base per dispatch, 1-4096 tokens (bf16)"
  timeout 120 $PY benchmarks/moe_dispatch.py --preset base --device cuda --dtype bf16 --repeats 20 \
    --name moe-dispatch-gpu --out "$OUT_DIR" || echo "moe stage failed or timed out (see above)"
fi

if has spec; then
  SPEC_RUN=${SPEC_RUN:-runs/spec-ee2}
  if [[ -f "$SPEC_RUN/run.json" ]]; then
    echo "== spec: self-speculative decoding of $SPEC_RUN (batch 1 and 32)"
    timeout 300 $PY benchmarks/decode.py --device cuda --speculative-run "$SPEC_RUN" --prompt-len 64 \
      --new-tokens 64 --spec-k 1,2,3 --spec-min-prob 0,0.3 --spec-batches 1,32 --repeats 2 \
      --name speculative-gpu --out "$OUT_DIR" || echo "spec stage failed or timed out (see above)"
  else
    echo "== spec: skipped, no trained early-exit run at $SPEC_RUN (autoglm train --config configs/speculative.yaml)"
  fi
fi
