#!/usr/bin/env bash
# The GPU tables of docs/benchmarks.md in one command, on a machine with one CUDA GPU:
#   1. the vision step cost (benchmarks/step_cost.py): ViT-B/16, 224 px, batch 64, every method, fp32;
#   2. the LLM step cost (benchmarks/llm_step_cost.py): the Llama-3.2-1B configuration (random weights from its
#      config, no download) in bf16, causal-LM loss, batch 8 x 512 tokens, every method, with the peak
#      torch.cuda.max_memory_allocated of each method in its own process;
#   3. the same LLM workload with the decoder linears in nf4 (bitsandbytes): floor, QLoRA and GRFT rows / columns /
#      sparse on the 4-bit base (llm_step_cost.py --quantize nf4).
# It writes JSON and markdown for each, and environment.txt (date, commit, GPU, versions, the GPU's load before
# the run, the commands), into docs/gpu/ (or --out-dir).
#
#   benchmarks/gpu_suite.sh                      # on the GPU machine, from the repository root or anywhere
#   benchmarks/gpu_suite.sh --quick --out-dir D  # the same tables at reduced sizes, in a few minutes (ViT-B/16 at
#                                                # batch 32; 4 layers of the Llama-3.2-1B configuration, batch
#                                                # 4 x 256; 3 timed rounds): scripts/gpu_check.sh runs it
#   benchmarks/gpu_suite.sh --tiny --out-dir D   # the same three commands at tiny sizes on the CPU (a check of
#                                                # this script; tests/test_bench_llm_step_cost.py runs it)
#   benchmarks/gpu_suite.sh --dry-run [--quick | --tiny]   # print the commands, run nothing
#
# PYTHON names the interpreter (default: python), which needs `pip install -e ".[bench,llm]"`.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
python="${PYTHON:-python}"
tiny=0
quick=0
dry_run=0
out_dir=""
while [ $# -gt 0 ]; do
    case "$1" in
        --tiny) tiny=1 ;;
        --quick) quick=1 ;;
        --dry-run) dry_run=1 ;;
        --out-dir) out_dir="$2"; shift ;;
        -h|--help) awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "gpu_suite.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

if [ "$tiny" = 1 ] && [ "$quick" = 1 ]; then
    echo "gpu_suite.sh: --tiny (CPU) and --quick (GPU) exclude each other" >&2
    exit 2
fi
if [ "$tiny" = 1 ]; then
    # CPU, one thread, tiny models, two methods each: checks the wiring, measures nothing worth keeping
    out_dir="${out_dir:-${TMPDIR:-/tmp}/grft_gpu_suite_tiny}"
    vision=(--model vit_tiny_patch16_224 --model-kwargs '{"depth": 2}' --num-classes 5 --img-size 32
            --batch-size 2 --device cpu --threads 1 --repeats 1 --warmup 0 --methods floor grft-col)
    llm=(--preset tiny --dtype float32 --device cpu --threads 1 --batch-size 2 --seq-len 16
         --repeats 1 --warmup 0 --peak-steps 2 --methods floor grft-col)
elif [ "$quick" = 1 ]; then
    # the GPU tables' commands at reduced sizes: every method, fewer rounds, a 4-layer Llama-3.2-1B
    out_dir="${out_dir:-$root/docs/gpu/quick}"
    vision=(--model vit_base_patch16_224 --num-classes 47 --img-size 224 --batch-size 32 --device cuda
            --repeats 3 --warmup 1)
    llm=(--preset llama-3.2-1b --layers 4 --dtype bfloat16 --device cuda --batch-size 4 --seq-len 256
         --repeats 3 --warmup 1 --peak-steps 2)
else
    out_dir="${out_dir:-$root/docs/gpu}"
    vision=(--model vit_base_patch16_224 --num-classes 47 --img-size 224 --batch-size 64 --device cuda
            --repeats 10 --warmup 3)
    llm=(--preset llama-3.2-1b --dtype bfloat16 --device cuda --batch-size 8 --seq-len 512
         --repeats 10 --warmup 3 --peak-steps 3)
fi
vision_cmd=("$python" "$here/step_cost.py" "${vision[@]}"
            --out "$out_dir/step_cost.json" --markdown "$out_dir/step_cost.md")
llm_cmd=("$python" "$here/llm_step_cost.py" "${llm[@]}"
         --out "$out_dir/llm_step_cost.json" --markdown "$out_dir/llm_step_cost.md")
# the same LLM workload on a 4-bit base: QLoRA beside GRFT (--methods, where given, lists methods of the base run);
# not in --quick, whose whole check must stay within 8 minutes (tests/test_cuda.py checks 4-bit layers on CUDA)
qllm=()
for arg in "${llm[@]}"; do
    [ "$arg" = "--methods" ] && break
    qllm+=("$arg")
done
qllm_cmd=("$python" "$here/llm_step_cost.py" "${qllm[@]}" --quantize nf4
          --out "$out_dir/llm_step_cost_nf4.json" --markdown "$out_dir/llm_step_cost_nf4.md")
[ "$quick" = 1 ] && qllm_cmd=()

if [ "$dry_run" = 1 ]; then
    printf '%q ' "${vision_cmd[@]}"; echo
    printf '%q ' "${llm_cmd[@]}"; echo
    [ ${#qllm_cmd[@]} -eq 0 ] || { printf '%q ' "${qllm_cmd[@]}"; echo; }
    exit 0
fi
if [ "$tiny" = 0 ] && ! "$python" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_suite.sh: torch sees no CUDA device here; on a CPU, --tiny checks this script" >&2
    exit 2
fi

mkdir -p "$out_dir"
{
    echo "date: $(date -Iseconds)"
    echo "commit: $(git -C "$root" rev-parse HEAD 2>/dev/null || echo unknown)"
    echo "host load (1, 5, 15 min): $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo unknown)"
    "$python" -c "import platform, torch, transformers, peft, timm; print('python', platform.python_version(), \
'| torch', torch.__version__, '| cuda', torch.version.cuda, '| transformers', transformers.__version__, \
'| peft', peft.__version__, '| timm', timm.__version__)"
    if command -v nvidia-smi > /dev/null; then
        echo "GPU before the run (other processes' load shows here):"
        nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,utilization.gpu --format=csv
    fi
    echo "commands:"
    printf '%q ' "${vision_cmd[@]}"; echo
    printf '%q ' "${llm_cmd[@]}"; echo
    [ ${#qllm_cmd[@]} -eq 0 ] || { printf '%q ' "${qllm_cmd[@]}"; echo; }
} > "$out_dir/environment.txt"

"${vision_cmd[@]}"
"${llm_cmd[@]}"
[ ${#qllm_cmd[@]} -eq 0 ] || "${qllm_cmd[@]}"
echo "gpu_suite.sh: results in $out_dir"
