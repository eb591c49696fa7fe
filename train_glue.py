#!/usr/bin/env python
"""GRFT on GLUE with a language model: ``python train_glue.py --dataset rte --data-dir glue_data`` (configs/glue/)."""
import sys
from pathlib import Path

from grft_vision.llm.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], Path(__file__).resolve().parent / "configs" / "glue"))
