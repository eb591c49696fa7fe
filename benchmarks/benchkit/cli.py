"""The command-line flags every step-cost script takes (``step_cost.py``, ``llm_step_cost.py``)."""
from __future__ import annotations

import argparse

import torch

from .compare import TIMERS
from .registry import MethodRegistry

__all__ = ["add_step_cost_arguments"]


def add_step_cost_arguments(parser: argparse.ArgumentParser, methods: MethodRegistry) -> None:
    """Add the device, method, timing, output and exit-status flags; ``--methods`` chooses from ``methods``
    (default: all of them, in registration order)."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--methods", nargs="+", default=list(methods.names()), choices=methods.names())
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per method (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds before timing")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timer", choices=TIMERS, default="wall",
                        help="time steps in wall-clock seconds, or in process CPU seconds (robust to other work on "
                             "the machine with --threads 1)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads for the run and every process it starts (None: torch's own)")
    parser.add_argument("--profile", action="store_true",
                        help="one extra profiled step per method: time by operator category")
    parser.add_argument("--out", default=None, help="JSON report path")
    parser.add_argument("--markdown", default=None, help="also write the markdown to this path")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 when a target is missed")
