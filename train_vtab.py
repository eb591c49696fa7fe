#!/usr/bin/env python
"""GRFT on VTAB-1k: ``python train_vtab.py --dataset dtd --rows 1`` (settings: configs/vtab/); = ``grft-train-vtab``."""
import sys

from grft_vision.commands import train_vtab

if __name__ == "__main__":
    sys.exit(train_vtab())
