#!/usr/bin/env bash
# Reproduce the GRFT paper's Table 2 (VTAB-1k, ViT-B/16 ImageNet-21k): every task x seed with its config
# (configs/vtab/<task>.yaml = the task's row of the paper's Table 7), then aggregate with benchmarks/paper_report.py.
#
#   DATA_DIR=~/tensorflow_datasets bash scripts/reproduce_vtab.sh
#
# Environment (all optional):
#   DATA_DIR    TFDS data dir (array_record) or the VTAB-1k folder-export root   [~/tensorflow_datasets]
#   RUNS        where run directories go: $RUNS/<task>/seed<seed>                 [runs/vtab]
#   SEEDS       seeds, space separated                                            [42 43 44]
#   TASKS       tasks, space separated                                            [all 19]
#   LAUNCHER    how to start a run, e.g. "torchrun --nproc_per_node 4"            [python]
#   PYTHON      interpreter for the report                                        [python]
#   EXTRA_ARGS  extra train_vtab.py flags, e.g. "--checkpoint /weights/augreg_in21k.npz --workers 8"
#   DRY_RUN=1   print the commands instead of running them
#
# Finished runs are skipped, interrupted ones resumed; see scripts/reproduce_common.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

DATA_DIR=${DATA_DIR:-$HOME/tensorflow_datasets}
RUNS=${RUNS:-runs/vtab}
NAMES=${TASKS:-"cifar100 caltech101 dtd flowers102 pets svhn sun397 patch_camelyon eurosat resisc45 diabetic_retinopathy clevr_count clevr_dist dmlab kitti dsprites_loc dsprites_ori smallnorb_azi smallnorb_ele"}
SCRIPT=train_vtab.py BENCHMARK=vtab TABLE=table2.md

root_of() { echo "$DATA_DIR"; }

source scripts/reproduce_common.sh
reproduce_all
