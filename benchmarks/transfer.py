"""Transfer benchmark, offline: pre-train a small timm ViT on a procedural many-class source task, then
fine-tune it on few-shot targets with every method at matched budgets, and report accuracy vs trainable %.

Why: ImageNet-21k weights and the VTAB/FGVC images cannot be downloaded here, yet the claims to check are
about *transfer*: gradient-chosen rows beat random rows at the same budget, GRFT beats a linear probe and
approaches full fine-tuning. A real pre-train -> fine-tune pipeline at small scale tests exactly that.

Stages (each timed, see ``docs/results.md``):

1. source data + pre-training (``transfer_bench.data.make_source``: shapes x textures x side of the image, 128
   classes; ``transfer_bench.pretrain``); the checkpoint is cached under ``--cache-dir`` keyed by its settings
   (``--quick`` never reads or writes the cache);
2. target data (``transfer_bench.data.make_target``: scikit-learn digits, count, location, orientation,
   texture; each with <= 1000 training images, as VTAB-1k);
3. fine-tuning: every (target, method, seed) job, in ``--workers`` processes of one thread each
   (``transfer_bench.jobs``);
4. report: ``results.json``, ``table.md`` and ``accuracy_vs_trainable.png`` in ``--out``.

Methods come from the registry ``transfer_bench.methods.METHODS``: a name maps to a function that prepares a
fresh copy of the pre-trained model for training and returns its trainable parameters (``Prepared``). A new
method is one ``METHODS.register(...)``; ``grft_method`` builds the GRFT family (selection, wrapping and the
regulariser all come from ``grft_vision``).

The width sweep (``--sweep``, ``transfer_bench.sweep``) runs the benchmark at several widths and pre-training
seeds (one checkpoint each) with a few methods, and reports the paired differences per checkpoint and pooled
(``transfer_bench.sweep_statistics``; ``sweep.json``, ``sweep.md``, ``width_sweep.png``).

Every static row / column choice records its first-order share (``transfer_bench.first_order``: the squared
task-loss gradient its rows hold, relative to the best rows of each layer); ``--first-order`` measures it for
every such method without training. ``--budget`` (``transfer_bench.budget``) compares GRFT's rows with random
and lowest-scored rows after 1, 2, 5 and 17 epochs of one run, at k = 1 and 8, biases trained or frozen, a
small and the tuned learning rate, and in genuinely shorter runs (``results.json``, ``table.md``, ``budget.png``).

    python benchmarks/transfer.py --out runs/transfer             # the full benchmark (< 30 min, 2 cores)
    python benchmarks/transfer.py --quick --out /tmp/transfer      # pipeline check (seconds)
    python benchmarks/transfer.py --tune --out runs/transfer-tune  # learning-rate / lambda choice on val splits
    python benchmarks/transfer.py --sweep --out runs/width-sweep   # widths 64, 128 x 2 checkpoints (CPU, 90 min)
    python benchmarks/transfer.py --first-order --out runs/first-order   # selection only (CPU, ~8 min)
    python benchmarks/transfer.py --budget --out runs/budget       # the budget study (CPU, ~30 min)
    python benchmarks/transfer.py --sweep --widths 192 384 --methods grft-row-k1 grft-row-k1-plain random-row-k1 \\
        lowest-row-k1 score-grasp linear bias --device cuda --out runs/width-sweep-gpu   # on a GPU machine
"""
from __future__ import annotations

import sys

from transfer_bench.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
