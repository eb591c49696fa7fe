#!/usr/bin/env bash
# The GPU check in one command, on a machine with one CUDA GPU (under 8 minutes on one H100):
#   1. the CUDA tests, python -m pytest -m cuda tests/test_cuda.py: every structure on linear, conv, depthwise and
#      grouped layers against the CPU, bf16 and fp16 autocast (a gradient scaler), channels_last, torch.compile,
#      mixed-adapter batches, DDP over NCCL at world size 1, a bitsandbytes 4-bit base;
#   2. benchmarks/gpu_suite.sh --quick: the vision and LLM step-cost tables at reduced sizes.
# Both run even when the first fails. Everything goes into one folder (default docs/gpu/check-<date>):
# pytest.log and pytest.xml (JUnit), gpu_suite.log, the suite's step_cost.{json,md}, llm_step_cost.{json,md} and
# environment.txt, and summary.txt (each part's command, exit status and seconds). The exit status is 0 when
# both parts passed, 1 when one failed, 2 without a CUDA device.
#
#   scripts/gpu_check.sh                   # from the repository root or anywhere
#   scripts/gpu_check.sh --out-dir DIR
#   scripts/gpu_check.sh --dry-run         # print the commands (and the suite's own), run nothing
#
# PYTHON names the interpreter (default: python), which needs pip install -e ".[bench,llm,test,quant]" (without
# bitsandbytes the 4-bit test is skipped, and says so in pytest.log).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
python="${PYTHON:-python}"
dry_run=0
out_dir=""
tests_limit=360  # seconds; a safety net against a hung process, not the budget
suite_limit=480
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) dry_run=1 ;;
        --out-dir) out_dir="$2"; shift ;;
        -h|--help) awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
out_dir="${out_dir:-$root/docs/gpu/check-$(date +%Y-%m-%d)}"

tests_cmd=("$python" -m pytest -m cuda "$root/tests/test_cuda.py" -rs -p no:cacheprovider
           --junitxml "$out_dir/pytest.xml")
suite_cmd=(bash "$root/benchmarks/gpu_suite.sh" --quick --out-dir "$out_dir")

if [ "$dry_run" = 1 ]; then
    printf '%q ' "${tests_cmd[@]}"; echo
    printf '%q ' "${suite_cmd[@]}"; echo
    PYTHON="$python" bash "$root/benchmarks/gpu_suite.sh" --quick --out-dir "$out_dir" --dry-run
    exit 0
fi
if ! "$python" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check.sh: torch sees no CUDA device here; --dry-run lists what it would run" >&2
    exit 2
fi

mkdir -p "$out_dir"
cd "$root"  # pytest reads setup.cfg (the cuda marker) from the repository root
summary="$out_dir/summary.txt"
{
    echo "date: $(date -Iseconds)"
    echo "commit: $(git -C "$root" rev-parse HEAD 2>/dev/null || echo unknown)"
} > "$summary"

# run_part NAME LIMIT LOG COMMAND...: the command's output to the terminal and LOG; its status and time to summary
failed=0
run_part() {
    local name="$1" limit="$2" log="$3"
    shift 3
    local start status note=""
    start=$(date +%s)
    echo "gpu_check.sh: $name: $(printf '%q ' "$@")"
    if timeout --kill-after=30 "$limit" "$@" 2>&1 | tee "$log"; then status=0; else status=$?; fi
    if [ "$status" = 124 ]; then note=" (stopped at the $limit s limit)"; fi
    {
        echo "$name: exit $status after $(( $(date +%s) - start )) s$note"
        echo "  $(printf '%q ' "$@")"
    } >> "$summary"
    if [ "$status" != 0 ]; then failed=1; fi
}

export PYTHON="$python"  # the suite's interpreter
run_part "cuda tests" "$tests_limit" "$out_dir/pytest.log" "${tests_cmd[@]}"
run_part "gpu_suite --quick" "$suite_limit" "$out_dir/gpu_suite.log" "${suite_cmd[@]}"

cat "$summary"
echo "gpu_check.sh: results in $out_dir"
exit "$failed"
