#!/usr/bin/env python
"""GRFT on FGVC: ``python train_fgvc.py --dataset cub --data-dir /data/CUB_200_2011`` (settings: configs/fgvc/)."""
import sys
from pathlib import Path

from grft_vision.training.cli import main

if __name__ == "__main__":
    sys.exit(main("fgvc", sys.argv[1:], Path(__file__).resolve().parent / "configs" / "fgvc"))
