"""Command line of the training scripts: flags over config files over defaults, and clean exits.

``train_vtab.py`` and ``train_fgvc.py`` call :func:`main` with their benchmark name and config folder;
other scripts (``train_glue.py``) also pass their settings class (a :class:`TrainConfig` subclass), their
dataset names, their flags and their :class:`~grft_vision.training.task.Task`.
Settings are resolved in this order, later wins: :class:`TrainConfig` / :class:`GRFTConfig` defaults,
``configs/<benchmark>/defaults.yaml``, ``configs/<benchmark>/<dataset>.yaml``, ``--config FILE``,
``--set key=value``, then the dedicated flags.

Exit codes: 0 done; 2 invalid input or environment (one ``error:`` line naming the value and the fix: a bad
flag or setting, missing data or weights, a run directory that holds another run, a full disk, no CUDA);
1 a run that fails (a non-finite loss, a diverging run; the last good checkpoint stays); 130 interrupted
(Ctrl-C; the line names the checkpoint to ``--resume`` from). Any other exception is a bug and keeps its
traceback.
"""
from __future__ import annotations

import argparse
import errno
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, NoReturn, Sequence

import torch
import yaml
from safetensors import SafetensorError

from ..config import GRFTConfig
from ..data import DATASET_NAMES
from ..errors import ConfigError, GRFTError, TrainingError, did_you_mean
from ..extras import MissingDependencyError
from ..tuner.quantized import QUANT_TYPES
from .config import (TrainConfig, VisionTrainConfig, builtin_config_dir, builtin_config_files, load_layers,
                     split_settings, yaml_problem)

if TYPE_CHECKING:
    from .task import Task

__all__ = ["build_parser", "resolve_settings", "main", "FLAGS", "check_dataset_name", "USER_ERRORS", "error_message",
           "describe_os_error"]

BENCHMARK_SPLITS = {"vtab": "train800val200", "fgvc": "trainval"}
Flags = Mapping[str, tuple[str, dict[str, Any]]]
_NOT_SCORES = {"epoch", "loss", "task_loss", "reg_loss"}  # history entries that are not evaluation scores
# the library's errors about what the user gave (exit 2); TrainingError (exit 1) is a run that failed
USER_ERRORS = (GRFTError,)
EXIT_INVALID, EXIT_FAILED, EXIT_INTERRUPTED = 2, 1, 130


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (the usage text is what ``--help`` is for)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_INVALID, f"error: {message}; see {self.prog} --help.\n")


def _yaml_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid YAML value ({yaml_problem(error)})") from None


def _number(text: str) -> int | float:
    """``"2"`` -> 2 (a count), ``"0.01"`` -> 0.01 (a fraction)."""
    value = _yaml_value(text)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
    return value


def _assignment(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    key = key.strip().replace("-", "_")
    try:
        return key, yaml.safe_load(value)
    except yaml.YAMLError as error:
        raise argparse.ArgumentTypeError(f"{key}={value!r} is not a valid YAML value ({yaml_problem(error)}); "
                                         "fix it, or quote it to pass text") from None


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
    "--quantize": ("quantize", {"choices": QUANT_TYPES}),
    "--method": ("method", {}),  # choices: the registered methods (build_parser)
    "--lr": ("lr", {"type": float}),
    "--batch-size": ("batch_size", {"type": int}),
    "--epochs": ("epochs", {"type": int}),
    "--warmup-epochs": ("warmup_epochs", {"type": int}),
    "--weight-decay": ("weight_decay", {"type": float}),
    "--seed": ("seed", {"type": int}),
    "--num-subsets": ("num_subsets", {"type": int}),
    "--reg-lambda": ("reg_lambda", {"type": float}),
    "--reg-blocks": ("reg_blocks", {"type": _yaml_value}),
    "--selection-views": ("selection_views", {"type": int}),
    "--run-dir": ("run_dir", {}),
    "--logdir": ("logdir", {}),
    "--eval-every": ("eval_every", {"type": int}),
    "--device": ("device", {}),
    "--divergence-factor": ("divergence_factor", {"type": float}),
}


def benchmark_datasets(config_dir: str | Path) -> list[str]:
    """The datasets a script runs: those its config folder has a file for (``<dataset>.yaml``)."""
    return sorted(path.stem for path in Path(config_dir).glob("*.yaml") if path.stem != "defaults")


class _Defaults:
    """The real default of every setting of a script, for ``--help``: the benchmark's ``defaults.yaml``, else the
    settings classes' own; and which settings a dataset's config file may change."""

    def __init__(self, config_dir: str | Path, config_cls: type[TrainConfig]) -> None:
        folder = Path(config_dir)
        self.benchmark = _yaml_mapping(folder / "defaults.yaml")
        self.per_dataset = set().union(*(_yaml_mapping(path) for path in folder.glob("*.yaml")
                                         if path.stem != "defaults"))
        self.config_cls = config_cls

    def value(self, key: str) -> Any:
        if key in self.benchmark:
            return self.benchmark[key]
        item = self.config_cls.__dataclass_fields__.get(key)
        if item is not None:
            return item.default
        return GRFTConfig.default_of(key) if key in GRFTConfig.keys() else None

    def text(self, key: str) -> str:
        value = self.value(key)
        text = f"default: {'not set' if value is None else value}"
        return text + (", or the dataset's config" if key in self.per_dataset else "")


def _yaml_mapping(path: Path) -> dict[str, Any]:
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, yaml.YAMLError):
        return {}
    return values if isinstance(values, dict) else {}


def build_parser(benchmark: str, config_dir: str | Path | None = None, *,
                 config_cls: type[TrainConfig] = VisionTrainConfig, dataset_names: Sequence[str] | None = None,
                 flags: Flags | None = None) -> argparse.ArgumentParser:
    """The argument parser of ``train_<benchmark>.py``; its help shows every option's real default.

    Args:
        benchmark: the script's benchmark name.
        config_dir: its config folder (default: the benchmark's built-in configs).
        config_cls: the settings class the flags fill (for the help texts and defaults).
        dataset_names: valid ``--dataset`` values; None: those the config folder has a file for.
        flags: ``{flag: (setting key, argparse options)}``; None: :data:`FLAGS`.
    """
    config_dir = builtin_config_dir(benchmark) if config_dir is None else config_dir
    defaults = _Defaults(config_dir, config_cls)
    parser = _Parser(description=f"GRFT fine-tuning on {benchmark.upper()}. Settings: the defaults shown below < "
                                 f"{Path(config_dir).name}/defaults.yaml < {Path(config_dir).name}/<dataset>.yaml < "
                                 "--config < --set < flags.")
    names = list(dataset_names) if dataset_names is not None else benchmark_datasets(config_dir)
    parser.add_argument("--dataset", required=True, help=f"one of: {', '.join(names)}")
    structure = parser.add_mutually_exclusive_group()
    shape = f"(default: the dataset's config; {defaults.value('structure')}s, k={defaults.value('k')} otherwise)"
    structure.add_argument("--rows", type=_number, metavar="K", help=f"train K rows of every weight {shape}")
    structure.add_argument("--cols", type=_number, metavar="K", help="train K columns of every weight")
    structure.add_argument("--sparse", type=_number, metavar="K", help="train K entries of every row (GPS)")
    from .methods import METHODS

    for flag, (key, options) in (FLAGS if flags is None else flags).items():
        if key == "method":
            options = {**options, "choices": METHODS.names()}
        help_text = f"{_help(key, config_cls)} ({defaults.text(key)})"
        parser.add_argument(flag, dest=key, default=None, help=help_text, **options)
    if "download" in config_cls.__dataclass_fields__:
        parser.add_argument("--download", action="store_const", const=True, default=None,
                            help=f"{_help('download', config_cls)} (default: off)")
    parser.add_argument("--no-pretrained", dest="pretrained", action="store_const", const=False, default=None,
                        help="random initialisation (no weights are loaded)")
    parser.add_argument("--no-amp", dest="amp", action="store_const", const=False, default=None,
                        help="disable mixed precision on CUDA")
    parser.add_argument("--quiet", action="store_const", const=True, default=None, help="no progress bars")
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its checkpoint")
    start.add_argument("--overwrite", action="store_true",
                       help="start a new run in --run-dir even if it holds one (its files are deleted)")
    parser.add_argument("--config", dest="config_files", action="append", default=[], metavar="FILE",
                        help="extra YAML settings file (repeatable)")
    parser.add_argument("--set", dest="assignments", action="append", default=[], type=_assignment,
                        metavar="KEY=VALUE", help="override any setting, e.g. --set temperature=0.1")
    return parser


def _help(key: str, config_cls: type[TrainConfig] = VisionTrainConfig) -> str:
    item = config_cls.__dataclass_fields__.get(key)
    return item.metadata.get("help", "") if item is not None else GRFTConfig.help_text(key)


def check_dataset_name(name: str, valid: Sequence[str]) -> None:
    """Raise ConfigError naming the closest and all valid names when ``name`` is not in ``valid``."""
    if name not in valid:
        raise ConfigError(f"Unknown dataset {name!r}.{did_you_mean(name, valid)} Valid names: {', '.join(valid)}.")


def resolve_settings(benchmark: str, argv: Sequence[str] | None, config_dir: str | Path, *,
                     config_cls: type[TrainConfig] = VisionTrainConfig, dataset_names: Sequence[str] | None = None,
                     flags: Flags | None = None) -> tuple[TrainConfig, GRFTConfig, str]:
    """Parse ``argv`` and resolve every setting; returns ``(train config, GRFT config, start)``.

    ``start`` is ``"resume"`` (``--resume``), ``"overwrite"`` (``--overwrite``) or ``"new"``.
    ``config_cls``, ``dataset_names`` and ``flags`` describe the script (see :func:`build_parser`); the
    defaults are those of the vision scripts.

    Raises:
        ConfigError: an unknown dataset name (the message lists the valid ones), an unknown key in a file or
            ``--set``, a file that is not valid YAML, or an invalid value.
    """
    args = build_parser(benchmark, config_dir, config_cls=config_cls, dataset_names=dataset_names,
                        flags=flags).parse_args(argv)
    if dataset_names is None and args.dataset in DATASET_NAMES and args.dataset not in benchmark_datasets(config_dir):
        script = "train_fgvc.py" if benchmark == "vtab" else "train_vtab.py"
        raise ConfigError(f"{args.dataset!r} is not a {benchmark.upper()} dataset; run it with {script}.")
    check_dataset_name(args.dataset, dataset_names if dataset_names is not None else benchmark_datasets(config_dir))
    files = [*builtin_config_files(config_dir, args.dataset), *map(Path, args.config_files)]
    for path in files[2:]:
        if not path.is_file():
            state = "is not a file" if path.exists() else "does not exist"
            raise ConfigError(f"config file {path} {state}; pass a YAML file of settings to --config.")
    settings = load_layers(files, config_cls)
    if benchmark in BENCHMARK_SPLITS:
        settings.setdefault("train_split", BENCHMARK_SPLITS[benchmark])
    settings["dataset"] = args.dataset
    settings.update(dict(args.assignments))
    settings.update({key: value for key, value in vars(args).items()
                     if key in config_cls.__dataclass_fields__ or key in GRFTConfig.keys()
                     if value is not None and key != "dataset"})
    for flag, structure in (("rows", "row"), ("cols", "column"), ("sparse", "sparse")):
        if getattr(args, flag) is not None:
            settings.update(structure=structure, k=getattr(args, flag))
    train, grft = split_settings(settings, "command line", config_cls)
    return train, grft, "resume" if args.resume else "overwrite" if args.overwrite else "new"


def main(benchmark: str, argv: Sequence[str] | None, config_dir: str | Path | None = None, *,
         config_cls: type[TrainConfig] = VisionTrainConfig, dataset_names: Sequence[str] | None = None,
         flags: Flags | None = None, task: Task | None = None) -> int:
    """Run ``train_<benchmark>.py``: resolve settings, train, evaluate. Returns the exit code (see the module).

    Args:
        benchmark, argv, config_dir: the script's benchmark name, its arguments, its config folder (default: the
            benchmark's built-in configs).
        config_cls, dataset_names, flags: see :func:`resolve_settings` (defaults: the vision scripts').
        task: the run's :class:`~grft_vision.training.task.Task`; None: the vision task.
    """
    train = None
    try:
        from .runner import run  # heavy imports only once the arguments are valid

        config_dir = builtin_config_dir(benchmark) if config_dir is None else config_dir
        train, grft, start = resolve_settings(benchmark, argv, config_dir, config_cls=config_cls,
                                              dataset_names=dataset_names, flags=flags)
        metrics = run(train, grft, resume=start == "resume", overwrite=start == "overwrite", task=task)
    except TrainingError as error:
        return _fail(EXIT_FAILED, error_message(error))
    except USER_ERRORS as error:
        return _fail(EXIT_INVALID, error_message(error))
    except MissingDependencyError as error:
        return _fail(EXIT_INVALID, str(error))
    except OSError as error:  # disk full, permissions, a folder where a file should be, ...
        return _fail(EXIT_INVALID, describe_os_error(error))
    except SafetensorError as error:
        return _fail(EXIT_INVALID, f"a .safetensors file is truncated or corrupt ({_one_line(error)}); replace it.")
    except torch.cuda.OutOfMemoryError:
        return _fail(EXIT_INVALID, "out of GPU memory; lower --batch-size (and selection_batch_size) and start "
                                   "again with --overwrite.")
    except KeyboardInterrupt:
        return _fail(EXIT_INTERRUPTED, _interrupted(train), prefix="interrupted")
    print(summary_line(metrics, train.eval_split, task.main_metric if task is not None else "top1"))
    return 0


def summary_line(metrics: Mapping[str, Any], eval_split: str, main_metric: str) -> str:
    """The last line of a run: its scores, the trainable share, selection and training time, the run directory.

    ``test top1 0.9900 | trainable 0.62 % of 5.53 M parameters | selection 2.1 s, training 38.4 s | runs/x``
    """
    last = metrics["history"][-1]
    names = [main_metric, *(n for n in last if n not in _NOT_SCORES and n != main_metric)]
    scores = "  ".join(f"{name} {last[name]:.4f}" for name in names)
    share = f"trainable {metrics['trainable_percent']:.2f} % of {metrics['total'] / 1e6:.2f} M parameters"
    times = f"selection {metrics['selection_seconds']:.1f} s, training {metrics['train_seconds']:.1f} s"
    return f"{eval_split} {scores} | {share} | {times} | {metrics['run_dir']}"


def _fail(code: int, message: str, prefix: str = "error") -> int:
    print(f"{prefix}: {message}", file=sys.stderr)
    return code


def error_message(error: BaseException) -> str:
    """The library error's message; a DataLoader worker's copy is cut back to the original message."""
    text = str(error).strip() or type(error).__name__
    if "Original Traceback" in text:  # torch re-raises a worker's error with the worker's traceback in it
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return text


def _one_line(error: BaseException) -> str:
    """Another library's message, on one line."""
    return " ".join(error_message(error).split())


def describe_os_error(error: OSError) -> str:
    """One line naming the file and what to do, for the environment errors a run meets."""
    where = f" {error.filename}" if error.filename is not None else ""
    if error.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return (f"no space left on the device while writing{where}; free some space, then run again (with --resume "
                "once the run has a checkpoint).")
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"permission denied:{where}; choose a path you can write to (e.g. --run-dir) or fix its permissions."
    if error.errno == errno.ENOENT:
        return f"no such file or directory:{where}; check the path."
    if error.errno in (errno.ENOTDIR, errno.EEXIST, errno.EISDIR):
        return f"{error.strerror}:{where}; a file stands where a folder is needed (or the reverse); fix the path."
    return f"{error.strerror or _one_line(error)}:{where}; check the path and the device."


def _interrupted(train: TrainConfig | None) -> str:
    """What to tell after Ctrl-C: where the last checkpoint is and how to continue from it."""
    if train is None or train.run_dir is None:
        return "stopped before the run started; nothing was written."
    checkpoint = Path(train.run_dir) / "checkpoint.pt"
    if checkpoint.is_file():
        return f"the last checkpoint is {checkpoint}; continue with the same command plus --resume."
    if Path(train.run_dir).is_dir() and any(Path(train.run_dir).iterdir()):
        return f"stopped before the first checkpoint of {train.run_dir}; start again with --overwrite."
    return "stopped before the run wrote anything; start it again."
