#!/usr/bin/env python
"""GRFT on VTAB-1k: ``python train_vtab.py --dataset dtd --rows 1`` (settings: configs/vtab/)."""
import sys
from pathlib import Path

from grft_vision.training.cli import main

if __name__ == "__main__":
    sys.exit(main("vtab", sys.argv[1:], Path(__file__).resolve().parent / "configs" / "vtab"))
