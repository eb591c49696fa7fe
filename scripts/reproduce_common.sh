# Shared by reproduce_vtab.sh and reproduce_fgvc.sh (sourced, not run): every dataset x seed with its config,
# then benchmarks/paper_report.py. The caller sets SCRIPT, BENCHMARK, TABLE, NAMES, RUNS and a function
# `root_of NAME` printing the --data-dir of a dataset.
#
# A run whose metrics.json exists is skipped; one with a checkpoint.pt but no metrics.json (interrupted) is
# continued with --resume; one stopped before its first checkpoint is started again with --overwrite. A
# failed run does not stop the others; the script exits 1 at the end if any failed.
SEEDS=${SEEDS:-"42 43 44"}
LAUNCHER=${LAUNCHER:-python}
PYTHON=${PYTHON:-python}
EXTRA_ARGS=${EXTRA_ARGS:-}
DRY_RUN=${DRY_RUN:-0}

run() {
    echo "+ $*"
    if [ "$DRY_RUN" != 1 ]; then "$@"; fi
}

reproduce_all() {
    local failed=() name seed dir root resume report_status=0
    for name in $NAMES; do
        root=$(root_of "$name")
        for seed in $SEEDS; do
            dir="$RUNS/$name/seed$seed"
            if [ -f "$dir/metrics.json" ]; then
                echo "skip $dir (finished: metrics.json exists)"
                continue
            fi
            resume=()
            if [ -f "$dir/checkpoint.pt" ]; then
                resume=(--resume)
            elif [ -d "$dir" ] && [ -n "$(ls -A "$dir")" ]; then
                resume=(--overwrite)
            fi
            # shellcheck disable=SC2086  # LAUNCHER and EXTRA_ARGS are word lists on purpose
            if ! run $LAUNCHER "$SCRIPT" --dataset "$name" --seed "$seed" --run-dir "$dir" --data-dir "$root" \
                    --quiet ${resume[@]+"${resume[@]}"} $EXTRA_ARGS; then
                echo "FAILED: $dir" >&2
                failed+=("$dir")
            fi
        done
    done
    run "$PYTHON" benchmarks/paper_report.py "$RUNS" --benchmark "$BENCHMARK" --out "$RUNS/$TABLE" || report_status=$?
    if [ ${#failed[@]} -gt 0 ]; then
        echo "${#failed[@]} run(s) failed: ${failed[*]}" >&2
        return 1
    fi
    return "$report_status"
}
