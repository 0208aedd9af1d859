#!/usr/bin/env bash
# The GPU check of issue #14, in one call (budget: under 8 minutes on an H100):
#   (a) the Triton kernels against the reference math on CUDA, fp32/bf16/fp16, odd shapes
#       (M = 4133, K/N = 4096+64, r in {8,16,64,128}, k in {1,2,4,8}, hybrid, dropout input,
#       fp32 adapters on 16-bit bases), forward and backward; then one projection fwd+bwd
#       fused vs frozen at the design shapes (benchmarks/kernel_check.py);
#   (b) one training step at the design sizes (Llama-shaped, hidden 2048, 8 layers, 4x1024
#       tokens, bf16, all 7 projections, GraLoRA r64 k4 and LoRA r64) through the backend
#       against frozen compiled and PEFT compiled, with peak memory and first-step (compile)
#       time (benchmarks/step.py --device cuda).
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine
#   bash benchmarks/gpu_check.sh --tiny     # the same pipeline on the CPU: TRITON_INTERPRET=1,
#                                           # tiny shapes (checks the script, not the GPU)
# Outputs go to $OUT (default benchmarks/gpu_out): kernels.{txt,json}, step.{txt,json}.
# Each part has its own time limit, so the script always ends and reports what it got.
# Knobs: KERNEL_TIMEOUT (s, default 210), STEP_TIMEOUT (s, default 330), STEP_VARIANTS,
# KERNEL_DTYPES (default fp32,bf16,fp16).
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/gpu_out}"
mkdir -p "$OUT"
TINY=0
[ "${1:-}" = "--tiny" ] && TINY=1
STEP_VARIANTS="${STEP_VARIANTS:-=frozen compiled,=PEFT LoRA compiled,=PEFT GraLoRA compiled,=peftcompile LoRA eager,=peftcompile LoRA backend,=peftcompile GraLoRA eager,=peftcompile GraLoRA backend}"
if [ "$TINY" = 1 ]; then  # the interpreter on a shared CPU is slow; the limits are for the GPU
  KERNEL_TIMEOUT="${KERNEL_TIMEOUT:-1200}"; STEP_TIMEOUT="${STEP_TIMEOUT:-1200}"
fi
KERNEL_TIMEOUT="${KERNEL_TIMEOUT:-210}"
STEP_TIMEOUT="${STEP_TIMEOUT:-330}"
KERNEL_DTYPES="${KERNEL_DTYPES:-fp32,bf16,fp16}"
start=$(date +%s)

echo "== environment"
date -u
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
python - <<'EOF'
import importlib, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
for m in ("triton", "transformers", "peft"):
    try:
        print(m, importlib.import_module(m).__version__)
    except Exception as e:
        print(m, "MISSING:", type(e).__name__, e)
EOF

status=0
if [ "$TINY" = 1 ]; then
  export TRITON_INTERPRET=1
  KARGS=(--device cpu --tiny --dtypes "${KERNEL_DTYPES}")
  SARGS=(--device cpu --tiny --threads 1 --iters 3 --rounds 1)
else
  KARGS=(--device cuda --dtypes "${KERNEL_DTYPES}" --bench)
  SARGS=(--device cuda)
fi

echo "== (a) kernels vs reference math ($(($(date +%s) - start)) s)"
timeout "$KERNEL_TIMEOUT" python benchmarks/kernel_check.py "${KARGS[@]}" --json "$OUT/kernels.json" \
  2>&1 | tee "$OUT/kernels.txt"
rc=${PIPESTATUS[0]}
[ "$rc" = 124 ] && echo "kernel check: TIMED OUT after ${KERNEL_TIMEOUT} s"
[ "$rc" != 0 ] && status=1

echo "== (b) training step ($(($(date +%s) - start)) s)"
timeout "$STEP_TIMEOUT" python benchmarks/step.py "${SARGS[@]}" --variants "$STEP_VARIANTS" \
  --json "$OUT/step.json" 2>&1 | grep -v "Warning\|warn(" | tee "$OUT/step.txt"
rc=${PIPESTATUS[0]}
[ "$rc" = 124 ] && echo "step benchmark: TIMED OUT after ${STEP_TIMEOUT} s"
[ "$rc" != 0 ] && status=1

echo "== done in $(($(date +%s) - start)) s, status $status"
exit $status
