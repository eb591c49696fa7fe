"""The command line of ``benchmarks/transfer.py``: the benchmark, ``--tune``, ``--sweep``, ``--first-order``,
``--budget``."""
from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from .budget import BUDGET, QUICK_BUDGET, budget_markdown, run_budget
from .data import TARGETS
from .first_order import first_order_markdown
from .methods import METHODS, SUITES
from .orchestration import run_benchmark, run_first_order, tune
from .provenance import command_line
from .report import to_markdown
from .settings import DEFAULT_LR, DEFAULT_REG_LAMBDA, FULL, QUICK, Settings
from .sweep import QUICK_SWEEP, SWEEP, run_sweep
from .sweep_statistics import sweep_markdown

__all__ = ["parse_args", "settings_from_args", "main"]

DESCRIPTION = ("Transfer benchmark, offline: pre-train a small timm ViT on a procedural many-class source task, "
               "then fine-tune it on few-shot targets with every method at matched budgets, and report accuracy vs "
               "trainable %.")


def _parse_lr(values: list[str]) -> dict[str, float]:
    parsed = {}
    for text in values:
        family, _, value = text.partition("=")
        if family not in DEFAULT_LR or not value:
            raise SystemExit(f"--lr expects FAMILY=VALUE with FAMILY in {sorted(DEFAULT_LR)}, got {text!r}")
        parsed[family] = float(value)
    return parsed


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The parsed flags; ``SystemExit`` for a device torch does not see or flags of another mode."""
    parser = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny settings, no cache: a pipeline check")
    parser.add_argument("--tune", action="store_true", help="choose learning rates and lambda on validation splits")
    parser.add_argument("--sweep", action="store_true",
                        help="the width sweep: the benchmark at every width and pre-training seed (--widths, "
                             "--pretrain-seeds), with the sweep's methods unless --methods")
    parser.add_argument("--first-order", action="store_true",
                        help="the first-order share of every static row / column choice (selection only, no "
                             "training), or of --methods")
    parser.add_argument("--budget", action="store_true",
                        help="the budget study: GRFT vs random vs lowest-scored rows after 1, 2, 5 and 17 epochs, "
                             "at k 1 and 8, biases trained or frozen, a small and the tuned learning rate")
    parser.add_argument("--widths", nargs="+", type=int, default=None,
                        help=f"sweep widths (default {' '.join(map(str, SWEEP.widths))}; "
                             f"heads = width / {SWEEP.head_dim})")
    parser.add_argument("--pretrain-seeds", nargs="+", type=int, default=None,
                        help=f"sweep: one checkpoint per seed (default {' '.join(map(str, SWEEP.pretrain_seeds))})")
    parser.add_argument("--pretrain-seed", type=int, default=None,
                        help="the pre-training seed of the one checkpoint the other modes use (default 0): evidence "
                             "that compares methods is repeated on a second checkpoint this way")
    parser.add_argument("--device", default="cpu", help="where to pre-train and fine-tune: cpu, cuda, cuda:1, ...")
    parser.add_argument("--out", type=Path, default=Path("runs/transfer"), help="output directory")
    parser.add_argument("--cache-dir", type=Path, default=Path("~/.cache/grft_vision/transfer").expanduser(),
                        help="where the pre-trained checkpoint is cached")
    parser.add_argument("--no-cache", action="store_true", help="pre-train again and do not cache")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="fine-tuning processes (one thread each); 1 = in this process")
    parser.add_argument("--suite", choices=sorted(SUITES), default="paper",
                        help="the methods to run: 'paper' (GRFT, baselines, controls, ablations) or 'beyond' "
                             "(the SPEFT / ID3 / GEM scores, budgets and schedules, with GRFT and random rows)")
    parser.add_argument("--methods", nargs="+", default=None,
                        help=f"instead of a suite, any of: {' '.join(METHODS)}")
    parser.add_argument("--targets", nargs="+", default=None, help=f"subset of: {' '.join(TARGETS)}")
    parser.add_argument("--seeds", nargs="+", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None, help="fine-tuning cosine epochs (after warm-up)")
    parser.add_argument("--lr", action="append", default=[], metavar="FAMILY=VALUE",
                        help="override a family's learning rate (head, full, grft, lora)")
    parser.add_argument("--reg-lambda", type=float, default=DEFAULT_REG_LAMBDA, help="GRFT's L2 lambda")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.device != "cpu" and not (args.device.startswith("cuda") and torch.cuda.is_available()):
        raise SystemExit(f"--device {args.device}: torch sees no such device (CUDA available: "
                         f"{torch.cuda.is_available()}); use --device cpu or run on a GPU machine")
    modes = [f"--{mode}" for mode in ("sweep", "tune", "first-order", "budget")
             if getattr(args, mode.replace("-", "_"))]
    if len(modes) > 1:
        raise SystemExit(f"{' and '.join(modes)} are separate runs; pick one")
    if args.budget and (args.methods or args.lr or args.epochs):
        raise SystemExit("--budget runs its own methods, learning rates and epochs; drop --methods, --lr, --epochs")
    if not args.sweep and (args.widths or args.pretrain_seeds):
        raise SystemExit("--widths and --pretrain-seeds belong to the width sweep; add --sweep")
    if args.sweep and args.pretrain_seed is not None:
        raise SystemExit("the width sweep takes its checkpoints' seeds as --pretrain-seeds")
    return args


def settings_from_args(args: argparse.Namespace) -> Settings:
    """:data:`QUICK` or :data:`FULL` with the device, methods (or suite), targets, seeds and epochs of ``args``
    (no methods for ``--first-order`` without ``--methods``, and for ``--budget``: theirs are their own)."""
    overrides: dict[str, Any] = {"device": args.device}
    own_methods = args.first_order or args.budget
    overrides["methods"] = tuple(args.methods) if args.methods else None if own_methods else SUITES[args.suite]
    if args.targets:
        overrides["targets"] = tuple(args.targets)
    if args.seeds:
        overrides["seeds"] = tuple(args.seeds)
    if args.epochs:
        overrides["epochs"] = args.epochs
    if args.pretrain_seed is not None:
        overrides["pretrain_seed"] = args.pretrain_seed
    return dataclasses.replace(QUICK if args.quick else FULL, **overrides)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, ``--tune``, ``--sweep``, ``--first-order`` or ``--budget`` as the flags say; the exit
    status (0)."""
    args = parse_args(argv)
    settings = settings_from_args(args)
    cache_dir = None if (args.no_cache or args.quick) else args.cache_dir
    if args.sweep:
        sweep = QUICK_SWEEP if args.quick else SWEEP
        sweep = dataclasses.replace(sweep, widths=tuple(args.widths or sweep.widths),
                                    pretrain_seeds=tuple(args.pretrain_seeds or sweep.pretrain_seeds),
                                    methods=tuple(args.methods or sweep.methods))
        results = run_sweep(sweep, settings, args.out, cache_dir, args.workers, _parse_lr(args.lr), args.reg_lambda,
                            args.quiet, command_line(argv))
        if not args.quiet:
            print(sweep_markdown(results["summary"]))
    elif args.tune:
        tune(settings, args.out, cache_dir, args.workers, args.quiet)
    elif args.first_order:
        results = run_first_order(settings, args.out, cache_dir, args.workers, _parse_lr(args.lr), args.reg_lambda,
                                  args.quiet, command_line(argv))
        if not args.quiet:
            print(first_order_markdown(results["summary"]))
    elif args.budget:
        results = run_budget(QUICK_BUDGET if args.quick else BUDGET, settings, args.out, cache_dir, args.workers,
                             args.reg_lambda, args.quiet, command_line(argv))
        if not args.quiet:
            print(budget_markdown(results["summary"]))
    else:
        results = run_benchmark(settings, args.out, cache_dir, args.workers, _parse_lr(args.lr), args.reg_lambda,
                                args.quiet, command=command_line(argv))
        if not args.quiet:
            print(to_markdown(results))
    return 0
