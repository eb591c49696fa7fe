"""The command line ``python -m grft_vision.export CHECKPOINT --out merged.pth``: plain weights from any GRFT
checkpoint (a timm ``last.pth.tar`` or ``checkpoint-N``, a Trainer ``checkpoint-N/`` folder, a run's
``checkpoint.pt``, an adapter file or directory), merged and checked by a strict load before anything is
written (:mod:`grft_vision.io.export`). Exit codes: 0 written, 2 invalid input (one ``error:`` line).
"""
from __future__ import annotations

import argparse
import ast
import sys
from typing import Any, Sequence

import torch

from .errors import GRFTError
from .io.checkpoints import read_saved
from .io.export import check_output, export_merged, write_merged

__all__ = ["main"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _assignment(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m grft_vision.export",
                                     description="Merge the adapter of a GRFT checkpoint into plain model weights.")
    parser.add_argument("checkpoint", help="timm last.pth.tar, Trainer checkpoint-N/, checkpoint.pt or adapter")
    parser.add_argument("--out", required=True, help="merged.pth / .safetensors (or a directory: Hugging Face)")
    parser.add_argument("--model", help="timm model name (default: the one the checkpoint records)")
    parser.add_argument("--model-kwargs", nargs="*", default=[], type=_assignment, metavar="KEY=VALUE",
                        help="create_model options it was trained with, e.g. img_size=32 num_classes=10")
    parser.add_argument("--base", help="base weights of an adapter: file (timm) or folder / hub id (Hugging Face)")
    parser.add_argument("--pretrained", action="store_true", help="base weights: timm's pre-trained weights")
    parser.add_argument("--adapter-name", help="the adapter to merge when the checkpoint holds several")
    ema = parser.add_mutually_exclusive_group()
    ema.add_argument("--ema", "--use-ema", dest="ema", action="store_true",
                     help="timm checkpoints: merge the model EMA's weights (state_dict_ema) instead of the live ones, "
                          "as timm's validate.py --use-ema")
    ema.add_argument("--no-ema", dest="ema", action="store_false", help="merge the live weights (the default)")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32",
                        help="dtype of the written weights (bfloat16 / float16 halve them, for serving)")
    parser.add_argument("--no-check-weights", dest="check_weights", action="store_false",
                        help="load an adapter onto base weights other than its own on purpose")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 done, 2 invalid input with one ``error:`` line)."""
    args = _parser().parse_args(argv)
    try:
        check_output(args.out, [args.checkpoint, args.base])
        saved = read_saved(args.checkpoint, ema=args.ema)
        model = export_merged(saved, model=args.model, model_kwargs=dict(args.model_kwargs), base=args.base,
                              pretrained=args.pretrained, adapter_name=args.adapter_name,
                              check_weights=args.check_weights)
        out = write_merged(model.to(_DTYPES[args.dtype]), args.out)
    except GRFTError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a full disk, permissions, a folder where a file should be
        where = f" {error.filename}" if error.filename else ""
        print(f"error: {error.strerror or error}:{where}; check the path and the disk.", file=sys.stderr)
        return 2
    print(f"merged weights: {out}" + (f" (from {saved.weights})" if saved.weights else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
