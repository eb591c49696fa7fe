#!/usr/bin/env python
"""GRFT on GLUE with a language model: ``python train_glue.py --dataset rte --data-dir glue_data`` (configs/glue/);
= ``grft-train-glue``."""
import sys

from grft_vision.commands import train_glue

if __name__ == "__main__":
    sys.exit(train_glue())
