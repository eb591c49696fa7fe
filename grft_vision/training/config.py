"""The settings of one training run, layered: defaults < benchmark defaults < task file < --config < flags.

A run is described by two dataclasses: :class:`TrainConfig` (data, model, optimisation, outputs) and
:class:`~grft_vision.config.GRFTConfig` (what trains and how it is chosen). Config files and ``--set``
overrides use one flat namespace of keys from both; a key that belongs to neither is an error naming it
and the closest valid key.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterable, Mapping

import torch
import yaml
from timm.optim import list_optimizers
from timm.scheduler import create_scheduler_v2

from ..config import GRFTConfig, check_field_types, check_range, coerce_numbers
from ..errors import ConfigError, did_you_mean
from ..tuner.quantized import QUANT_TYPES

__all__ = ["TrainConfig", "VisionTrainConfig", "INTERPOLATIONS", "builtin_config_dir", "builtin_config_files", "load_layers",
           "split_settings", "resolved_settings", "max_workers", "yaml_problem"]

INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos", "random")  # timm's names


def max_workers() -> int:
    """The most DataLoader workers a run may ask for: the CPU cores of this machine, at least 8."""
    return max(8, os.cpu_count() or 1)


@dataclass
class TrainConfig:
    """The settings every run has, vision or language (the GRFT options live in :class:`GRFTConfig`).

    :class:`VisionTrainConfig` (``train_vtab.py``, ``train_fgvc.py``) and
    :class:`~grft_vision.llm.GlueTrainConfig` (``train_glue.py``) add what their kind of run needs.
    """

    # --- data ---------------------------------------------------------------------------------
    dataset: str = field(default="synthetic", metadata={"help": "Dataset name."})
    data_dir: str | None = field(default=None, metadata={"help": "Where the dataset is."})
    layout: str = field(default="auto", metadata={"help": "Data layout (auto: detected)."})
    train_split: str = field(default="train800val200", metadata={"help": "Split to train (and select) on."})
    eval_split: str = field(default="test", metadata={"help": "Split to report metrics on."})
    workers: int = field(default=2, metadata={"help": "DataLoader worker processes."})
    # --- model ------------------------------------------------------------------------------------
    model: str = field(default="vit_base_patch16_224.augreg_in21k", metadata={"help": "The model to fine-tune."})
    pretrained: bool = field(default=True, metadata={"help": "Load pre-trained weights (false: random initialisation)."})
    quantize: str | None = field(default=None, metadata={
        "help": "Keep the frozen linear layers quantized (bitsandbytes, QLoRA-style): nf4, fp4 or int8; the head, "
                "convolutions and norms stay in full precision. Needs the quant extra."})
    # --- optimisation -----------------------------------------------------------------------------
    method: str = field(default="grft", metadata={"help": "grft, full (full fine-tuning) or head (linear probe)."})
    opt: str = field(default="adam", metadata={"help": "timm optimizer name (create_optimizer_v2)."})
    lr: float = field(default=1e-3, metadata={"help": "Peak learning rate."})
    weight_decay: float = field(default=0.0, metadata={"help": "Weight decay."})
    batch_size: int = field(default=32, metadata={"help": "Global batch size (split over processes)."})
    epochs: int = field(default=100, metadata={"help": "Cosine epochs after the warm-up."})
    warmup_epochs: int = field(default=10, metadata={"help": "Linear warm-up epochs, added before --epochs."})
    warmup_lr: float = field(default=1e-7, metadata={"help": "Learning rate at the start of warm-up."})
    min_lr: float = field(default=1e-8, metadata={"help": "Learning rate at the end of the cosine."})
    sched: str = field(default="cosine", metadata={"help": "timm scheduler name (create_scheduler_v2)."})
    clip_grad: float | None = field(default=None, metadata={"help": "Clip the gradient norm to this value (> 0)."})
    smoothing: float = field(default=0.0, metadata={"help": "Label smoothing."})
    amp: bool = field(default=True, metadata={"help": "Mixed precision on CUDA (bf16 where supported)."})
    seed: int = field(default=42, metadata={"help": "Seed of the model head, data order and selection."})
    divergence_factor: float = field(default=10.0, metadata={
        "help": "Stop the run as diverged when the training loss stays above this many times its first-step value "
                "(and above this number) for divergence_window steps in a row; 0 disables the check."})
    divergence_window: int = field(default=20, metadata={"help": "Steps the loss must stay that high to stop."})
    # --- outputs ----------------------------------------------------------------------------------
    run_dir: str | None = field(default=None, metadata={"help": "Output directory; None: runs/<dataset>/<time>."})
    logdir: str | None = field(default=None, metadata={"help": "TensorBoard directory; None: <run_dir>/tb."})
    eval_every: int = field(default=10, metadata={"help": "Evaluate every N epochs (and at the end)."})
    quiet: bool = field(default=False, metadata={"help": "No progress bars (for logs)."})
    device: str | None = field(default=None, metadata={"help": "cuda, cpu, ...; None: CUDA when available."})
    # --- schedule granularity: fixed for the vision scripts, settings of subclasses (language models) ---------
    sched_on_updates: ClassVar[bool] = False  # step the schedule after every optimizer update, not every epoch
    warmup_ratio: ClassVar[float] = 0.0  # linear warm-up over this share of the updates of ``epochs``
    fsdp: ClassVar[bool] = False  # shard the frozen base with FSDP2 instead of DDP (language models)

    def __post_init__(self) -> None:
        check_field_types(self)
        from .methods import METHODS

        method = METHODS.get(self.method)
        if self.quantize is not None:
            if self.quantize not in QUANT_TYPES:
                raise ConfigError(f"quantize={self.quantize!r} must be one of {', '.join(QUANT_TYPES)}.")
            if method.trains_base:
                raise ConfigError(f"method={self.method!r} trains the base weights, which quantize={self.quantize!r} "
                                  "keeps frozen in 4/8 bits; use method=grft (or head), or drop quantize.")
        for name in ("epochs", "batch_size", "eval_every", "divergence_window"):
            check_range(self, name, low=1)
        for name in ("warmup_epochs", "seed", "weight_decay", "warmup_lr", "min_lr"):
            check_range(self, name, low=0)
        if not 0 <= self.workers <= max_workers():
            raise ConfigError(f"workers={self.workers!r} must be in [0, {max_workers()}]: each loader starts that "
                              "many processes, and more than the CPU cores only cost memory.")
        check_range(self, "lr", low=0, low_open=True)
        check_range(self, "clip_grad", low=0, low_open=True)
        check_range(self, "smoothing", low=0, high=1, high_open=True)
        if self.divergence_factor != 0:
            check_range(self, "divergence_factor", low=1, low_open=True)
        self._check_names()

    def _check_names(self) -> None:
        """Values timm or torch would refuse only later: optimizer, schedule, device."""
        optimizer = self.opt.lower().removeprefix("lookahead_")
        if optimizer not in list_optimizers():
            raise ConfigError(f"opt={self.opt!r} is not a timm optimizer.{did_you_mean(optimizer, list_optimizers())} "
                              "See timm.optim.list_optimizers().")
        if self.sched != "linear":
            try:
                create_scheduler_v2(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), sched=self.sched)
            except ValueError:
                raise ConfigError(f"sched={self.sched!r} is not a timm scheduler; use linear, cosine, tanh, step, "
                                  "multistep, poly, constant or none.") from None
        if self.device is not None:
            try:
                torch.device(self.device)
            except RuntimeError:
                raise ConfigError(f"device={self.device!r} is not a torch device; use cpu, cuda or cuda:N.") from None

    @property
    def total_epochs(self) -> int:
        """Warm-up plus cosine epochs."""
        return self.warmup_epochs + self.epochs


@dataclass
class VisionTrainConfig(TrainConfig):
    """Settings of ``train_vtab.py`` and ``train_fgvc.py``: the shared ones, plus images and timm models."""

    dataset: str = field(default="synthetic", metadata={"help": "Dataset name (VTAB task, FGVC dataset, synthetic)."})
    data_dir: str | None = field(default=None, metadata={"help": "TFDS data dir, VTAB folder root or FGVC root."})
    layout: str = field(default="auto", metadata={"help": "Data layout: auto, tfds, folder, json, official."})
    eval_split: str = field(default="test", metadata={"help": "Split to report top-1 on."})
    synthetic_classes: int = field(default=10, metadata={"help": "Classes of the synthetic dataset."})
    synthetic_samples: int = field(default=1000, metadata={"help": "Training images of the synthetic dataset."})
    synthetic_image_size: int = field(default=32, metadata={"help": "Side of the synthetic images (pixels)."})
    model: str = field(default="vit_base_patch16_224.augreg_in21k", metadata={"help": "timm model name."})
    pretrained: bool = field(default=True, metadata={"help": "Load pre-trained weights (hub or --checkpoint)."})
    checkpoint: str | None = field(default=None, metadata={"help": "Local weights file for the timm model."})
    img_size: int | None = field(default=None, metadata={"help": "Input side (pixels); None: the model's."})
    drop_path: float = field(default=0.0, metadata={"help": "Stochastic depth rate."})
    interpolation: str | None = field(default=None, metadata={"help": "Resize interpolation; None: protocol's."})
    mean: list[float] | None = field(default=None, metadata={"help": "Normalisation mean; None: the model's."})
    std: list[float] | None = field(default=None, metadata={"help": "Normalisation std; None: the model's."})
    mixup: float = field(default=0.0, metadata={"help": "Mixup alpha (0: off)."})
    cutmix: float = field(default=0.0, metadata={"help": "CutMix alpha (0: off)."})
    download: bool = field(default=False, metadata={
        "help": "VTAB from TFDS: build the task's data in --data-dir first when it is missing (needs internet and "
                "pip install 'grft-vision[tfds-prepare]')."})

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("synthetic_classes", "synthetic_samples", "img_size"):
            check_range(self, name, low=1)
        for name in ("mixup", "cutmix"):
            check_range(self, name, low=0)
        check_range(self, "synthetic_image_size", low=4)
        check_range(self, "drop_path", low=0, high=1, high_open=True)
        if self.interpolation is not None and self.interpolation not in INTERPOLATIONS:
            raise ConfigError(f"interpolation={self.interpolation!r} is not known; use one of "
                              f"{', '.join(INTERPOLATIONS)}.")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None and (len(value) != 3 or (name == "std" and min(value) <= 0)):
                raise ConfigError(f"{name}={value!r} must be 3 numbers, one per RGB channel"
                                  + (", each > 0." if name == "std" else "."))


def builtin_config_dir(benchmark: str) -> Path:
    """The folder of a benchmark's built-in configs (``vtab``, ``fgvc``, ``glue``): package data,
    ``grft_vision/configs/<benchmark>/`` (the repository's top-level ``configs/`` links there).

    Raises:
        ConfigError: the package holds no such folder (an unknown benchmark, or an incomplete install).
    """
    folder = importlib.resources.files("grft_vision") / "configs" / benchmark
    if not folder.is_dir():
        raise ConfigError(f"grft-vision has no built-in configs for {benchmark!r} ({folder}); reinstall the "
                          "package if it should (pip install --force-reinstall grft-vision).")
    return Path(str(folder))


def builtin_config_files(config_dir: str | Path, dataset: str) -> list[Path]:
    """``[<config_dir>/defaults.yaml, <config_dir>/<dataset>.yaml]``, the settings files every run reads first.

    Raises:
        ConfigError: either file is missing; a built-in config is never skipped silently.
    """
    config_dir = Path(config_dir)
    files = [config_dir / "defaults.yaml", config_dir / f"{dataset}.yaml"]
    for path in files:
        if not path.is_file():
            known = sorted(p.stem for p in config_dir.glob("*.yaml") if p.stem != "defaults")
            raise ConfigError(f"no config file {path}: {config_dir} has configs for "
                              f"{', '.join(known) or 'nothing'}. Run {dataset!r} with the script of its own "
                              "benchmark, or add the file.")
    return files


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def load_layers(paths: Iterable[str | Path], config_cls: type[TrainConfig] = VisionTrainConfig) -> dict[str, Any]:
    """Merge YAML mappings in order (later files override earlier ones), checking every key.

    ``config_cls`` is the run-settings class whose keys are valid besides :class:`GRFTConfig`'s
    (:class:`TrainConfig` or a subclass with more fields, e.g. the language-model scripts').
    """
    merged: dict[str, Any] = {}
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            try:
                values = yaml.safe_load(handle) or {}
            except yaml.YAMLError as error:
                raise ConfigError(f"{path}: not valid YAML ({yaml_problem(error)}); fix the file.") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping of settings, got {type(values).__name__}.")
        _check_keys(values, str(path), config_cls)
        merged.update(values)
    return merged


def yaml_problem(error: yaml.YAMLError) -> str:
    """A one-line description of a YAML parse error: what and where (line, column)."""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    mark = getattr(error, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


# other libraries' names for settings, so that a key typed from habit gets the right suggestion
_SYNONYMS = {"learning_rate": "lr", "optimizer": "opt", "scheduler": "sched", "lr_scheduler": "sched",
             "num_epochs": "epochs", "max_epochs": "epochs", "wd": "weight_decay", "bs": "batch_size",
             "output_dir": "run_dir", "out_dir": "run_dir", "num_workers": "workers", "label_smoothing": "smoothing",
             "warmup_steps": "warmup_epochs", "lr_min": "min_lr", "dataset_dir": "data_dir", "data_path": "data_dir"}


def _check_keys(values: Mapping[str, Any], where: str, config_cls: type[TrainConfig] = VisionTrainConfig) -> None:
    known = _field_names(config_cls) | set(GRFTConfig.keys())
    synonyms = {name: key for name, key in _SYNONYMS.items() if key in known}
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known | set(synonyms)), n=1)
            hint = f" Did you mean {synonyms.get(close[0], close[0])!r}?" if close else ""
            raise ConfigError(f"{where}: unknown setting {key!r}.{hint}")


def split_settings(values: Mapping[str, Any], where: str = "settings",
                   config_cls: type[TrainConfig] = VisionTrainConfig) -> tuple[TrainConfig, GRFTConfig]:
    """Build ``(config_cls, GRFTConfig)`` from one flat mapping of keys (``config_cls``: see :func:`load_layers`)."""
    _check_keys(values, where, config_cls)
    train_keys = _field_names(config_cls)
    train = config_cls(**coerce_numbers(config_cls, {k: v for k, v in values.items() if k in train_keys}))
    grft = GRFTConfig.from_dict({k: v for k, v in values.items() if k not in train_keys})
    return train, grft


def resolved_settings(train: TrainConfig, grft: GRFTConfig) -> dict[str, Any]:
    """The flat mapping of every setting of a run (what is saved as ``config.yaml``)."""
    return {**dataclasses.asdict(train), **grft.to_dict()}
