#!/usr/bin/env bash
# Reproduce the GRFT paper's Table 1 (FGVC, ViT-B/16 ImageNet-21k): every dataset x seed with its config
# (configs/fgvc/<dataset>.yaml = the dataset's row of the paper's Table 6), then aggregate with benchmarks/paper_report.py.
#
#   DATA_DIR=/data/fgvc bash scripts/reproduce_fgvc.sh
#
# Environment (all optional):
#   DATA_DIR    folder holding one root per dataset (VPT's names below)            [data/fgvc]
#   CUB_DIR, NABIRDS_DIR, FLOWERS_DIR, DOGS_DIR, CARS_DIR
#               a dataset's root, overriding $DATA_DIR/<name>: CUB_200_2011, nabirds, OxfordFlower,
#               Stanford-dogs, Stanford-cars
#   RUNS        where run directories go: $RUNS/<dataset>/seed<seed>             [runs/fgvc]
#   SEEDS       seeds, space separated                                          [42 43 44]
#   DATASETS    datasets, space separated                                       [cub nabirds flowers dogs cars]
#   LAUNCHER    how to start a run, e.g. "torchrun --nproc_per_node 4"          [python]
#   PYTHON      interpreter for the report                                      [python]
#   EXTRA_ARGS  extra train_fgvc.py flags, e.g. "--checkpoint /weights/augreg_in21k.npz --workers 8"
#   DRY_RUN=1   print the commands instead of running them
#
# Finished runs are skipped, interrupted ones resumed; see scripts/reproduce_common.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

DATA_DIR=${DATA_DIR:-data/fgvc}
RUNS=${RUNS:-runs/fgvc}
NAMES=${DATASETS:-"cub nabirds flowers dogs cars"}
SCRIPT=train_fgvc.py BENCHMARK=fgvc TABLE=table1.md

root_of() {
    case "$1" in
        cub) echo "${CUB_DIR:-$DATA_DIR/CUB_200_2011}" ;;
        nabirds) echo "${NABIRDS_DIR:-$DATA_DIR/nabirds}" ;;
        flowers) echo "${FLOWERS_DIR:-$DATA_DIR/OxfordFlower}" ;;
        dogs) echo "${DOGS_DIR:-$DATA_DIR/Stanford-dogs}" ;;
        cars) echo "${CARS_DIR:-$DATA_DIR/Stanford-cars}" ;;
        *) echo "unknown FGVC dataset: $1 (expected cub nabirds flowers dogs cars)" >&2; return 1 ;;
    esac
}

source scripts/reproduce_common.sh
reproduce_all
