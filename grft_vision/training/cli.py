"""Command line of the training scripts: flags over config files over defaults, and clean exits.

``train_vtab.py`` and ``train_fgvc.py`` call :func:`main` with their benchmark name and config folder;
other scripts (``train_glue.py``) also pass their settings class (a :class:`TrainConfig` subclass), their
dataset names, their flags and their :class:`~grft_vision.training.task.Task`.
Settings are resolved in this order, later wins: :class:`TrainConfig` / :class:`GRFTConfig` defaults,
``configs/<benchmark>/defaults.yaml``, ``configs/<benchmark>/<dataset>.yaml``, ``--config FILE``,
``--set key=value``, then the dedicated flags. Invalid input ends the process with one ``error:`` message
and exit code 2; a run that fails (e.g. a non-finite loss) exits with 1.
"""
from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import yaml

from ..adapter import AdapterError
from ..config import ConfigError, GRFTConfig
from ..data import DATASET_NAMES, DataNotFoundError, dataset_num_classes
from ..selection import SelectionError
from .config import TrainConfig, builtin_config_files, load_layers, split_settings
from .loop import TrainingError
from .model_factory import ModelLoadError

if TYPE_CHECKING:
    from .task import Task

__all__ = ["build_parser", "resolve_settings", "main", "FLAGS", "check_dataset_name"]

BENCHMARK_SPLITS = {"vtab": "train800val200", "fgvc": "trainval"}
Flags = Mapping[str, tuple[str, dict[str, Any]]]
_NOT_SCORES = {"epoch", "loss", "task_loss", "reg_loss"}  # history entries that are not evaluation scores


def _number(text: str) -> int | float:
    """``"2"`` -> 2 (a count), ``"0.01"`` -> 0.01 (a fraction)."""
    value = yaml.safe_load(text)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
    return value


def _assignment(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    return key.strip().replace("-", "_"), yaml.safe_load(value)


# flag -> (setting key, argparse keyword arguments); every flag defaults to "not given"
FLAGS: dict[str, tuple[str, dict[str, Any]]] = {
    "--data-dir": ("data_dir", {}),
    "--layout": ("layout", {}),
    "--train-split": ("train_split", {}),
    "--eval-split": ("eval_split", {}),
    "--workers": ("workers", {"type": int}),
    "--model": ("model", {}),
    "--checkpoint": ("checkpoint", {"metavar": "FILE"}),
    "--img-size": ("img_size", {"type": int}),
    "--drop-path": ("drop_path", {"type": float}),
    "--method": ("method", {"choices": ("grft", "full", "head")}),
    "--lr": ("lr", {"type": float}),
    "--batch-size": ("batch_size", {"type": int}),
    "--epochs": ("epochs", {"type": int}),
    "--warmup-epochs": ("warmup_epochs", {"type": int}),
    "--weight-decay": ("weight_decay", {"type": float}),
    "--seed": ("seed", {"type": int}),
    "--num-subsets": ("num_subsets", {"type": int}),
    "--reg-lambda": ("reg_lambda", {"type": float}),
    "--reg-blocks": ("reg_blocks", {"type": yaml.safe_load}),
    "--selection-views": ("selection_views", {"type": int}),
    "--run-dir": ("run_dir", {}),
    "--logdir": ("logdir", {}),
    "--eval-every": ("eval_every", {"type": int}),
    "--device": ("device", {}),
}


def build_parser(benchmark: str, *, config_cls: type[TrainConfig] = TrainConfig,
                 dataset_names: Sequence[str] | None = None, flags: Flags | None = None) -> argparse.ArgumentParser:
    """The argument parser of ``train_<benchmark>.py``.

    Args:
        benchmark: the script's benchmark name (for the description).
        config_cls: the settings class the flags fill (for the help texts).
        dataset_names: valid ``--dataset`` values; None: the vision datasets.
        flags: ``{flag: (setting key, argparse options)}``; None: :data:`FLAGS`.
    """
    parser = argparse.ArgumentParser(
        description=f"GRFT fine-tuning on {benchmark.upper()} (flags override config files).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--dataset", required=True, help=f"one of: {', '.join(dataset_names or DATASET_NAMES)}")
    structure = parser.add_mutually_exclusive_group()
    structure.add_argument("--rows", type=_number, metavar="K", help="train K rows of every weight")
    structure.add_argument("--cols", type=_number, metavar="K", help="train K columns of every weight")
    structure.add_argument("--sparse", type=_number, metavar="K", help="train K entries of every row (GPS)")
    for flag, (key, options) in (FLAGS if flags is None else flags).items():
        help_text = _help(key, config_cls)
        parser.add_argument(flag, dest=key, default=None, help=help_text, **options)
    parser.add_argument("--no-pretrained", dest="pretrained", action="store_const", const=False, default=None,
                        help="random initialisation (no weights are loaded)")
    parser.add_argument("--no-amp", dest="amp", action="store_const", const=False, default=None,
                        help="disable mixed precision on CUDA")
    parser.add_argument("--quiet", action="store_const", const=True, default=None, help="no progress bars")
    parser.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its checkpoint")
    parser.add_argument("--config", dest="config_files", action="append", default=[], metavar="FILE",
                        help="extra YAML settings file (repeatable)")
    parser.add_argument("--set", dest="assignments", action="append", default=[], type=_assignment,
                        metavar="KEY=VALUE", help="override any setting, e.g. --set temperature=0.1")
    return parser


def _help(key: str, config_cls: type[TrainConfig] = TrainConfig) -> str:
    for cls in (config_cls, GRFTConfig):
        for item in cls.__dataclass_fields__.values():
            if item.name == key:
                return item.metadata.get("help", "")
    return ""


def check_dataset_name(name: str, valid: Sequence[str]) -> None:
    """Raise ValueError naming the closest and all valid names when ``name`` is not in ``valid``."""
    if name not in valid:
        close = difflib.get_close_matches(name, list(valid), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"Unknown dataset {name!r}.{hint} Valid names: {', '.join(valid)}.")


def resolve_settings(benchmark: str, argv: Sequence[str] | None, config_dir: str | Path, *,
                     config_cls: type[TrainConfig] = TrainConfig, dataset_names: Sequence[str] | None = None,
                     flags: Flags | None = None) -> tuple[TrainConfig, GRFTConfig, bool]:
    """Parse ``argv`` and resolve every setting; returns ``(train config, GRFT config, resume?)``.

    ``config_cls``, ``dataset_names`` and ``flags`` describe the script (see :func:`build_parser`); the
    defaults are those of the vision scripts.

    Raises:
        ConfigError: an unknown key in a file or ``--set``, or an invalid value.
        ValueError: an unknown dataset name (the message lists the valid ones).
    """
    args = build_parser(benchmark, config_cls=config_cls, dataset_names=dataset_names, flags=flags).parse_args(argv)
    if dataset_names is None:
        dataset_num_classes(args.dataset)  # raises ValueError listing the valid names
    else:
        check_dataset_name(args.dataset, dataset_names)
    files = [*builtin_config_files(config_dir, args.dataset), *map(Path, args.config_files)]
    missing = [str(path) for path in files[2:] if not path.is_file()]
    if missing:
        raise ConfigError(f"config file {missing[0]} does not exist.")
    settings = load_layers(files, config_cls)
    if benchmark in BENCHMARK_SPLITS:
        settings.setdefault("train_split", BENCHMARK_SPLITS[benchmark])
    settings["dataset"] = args.dataset
    settings.update(dict(args.assignments))
    settings.update({key: value for key, value in vars(args).items()
                     if key in config_cls.__dataclass_fields__ or key in GRFTConfig.__dataclass_fields__
                     if value is not None and key != "dataset"})
    for flag, structure in (("rows", "row"), ("cols", "column"), ("sparse", "sparse")):
        if getattr(args, flag) is not None:
            settings.update(structure=structure, k=getattr(args, flag))
    train, grft = split_settings(settings, "command line", config_cls)
    return train, grft, args.resume


def main(benchmark: str, argv: Sequence[str] | None, config_dir: str | Path, *,
         config_cls: type[TrainConfig] = TrainConfig, dataset_names: Sequence[str] | None = None,
         flags: Flags | None = None, task: Task | None = None) -> int:
    """Run ``train_<benchmark>.py``: resolve settings, train, evaluate. Returns the exit code.

    Args:
        benchmark, argv, config_dir: the script's benchmark name, its arguments, its config folder.
        config_cls, dataset_names, flags: see :func:`resolve_settings` (defaults: the vision scripts').
        task: the run's :class:`~grft_vision.training.task.Task`; None: the vision task.
    """
    from .runner import run  # heavy imports only once the arguments are valid

    try:
        train, grft, resume = resolve_settings(benchmark, argv, config_dir, config_cls=config_cls,
                                               dataset_names=dataset_names, flags=flags)
        metrics = run(train, grft, resume=resume, task=task)
    except (ConfigError, DataNotFoundError, SelectionError, AdapterError, ModelLoadError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except TrainingError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if task is None:
        print(f"test top-1: {metrics['top1']:.4f}  (run directory: {metrics['run_dir']})")
    else:
        last = metrics["history"][-1]
        names = [task.main_metric, *(n for n in last if n not in _NOT_SCORES and n != task.main_metric)]
        scores = "  ".join(f"{name} {last[name]:.4f}" for name in names)
        print(f"{train.eval_split}: {scores}  (run directory: {metrics['run_dir']})")
    return 0
