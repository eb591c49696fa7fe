#!/usr/bin/env python
"""GRFT on FGVC: ``python train_fgvc.py --dataset cub --data-dir /data/CUB_200_2011`` (settings: configs/fgvc/);
= ``grft-train-fgvc``."""
import sys

from grft_vision.commands import train_fgvc

if __name__ == "__main__":
    sys.exit(train_fgvc())
