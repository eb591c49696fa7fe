"""The configuration of a GRFT fine-tuning run: which weights adapt, how, and what else trains.

One flat dataclass, in the style of PEFT's method configs: every option is a field with a default and a
help text, validated in ``__post_init__``, loadable from a dict or a YAML file. Unknown keys are an error
that names the key and the closest valid one, never silently ignored.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from .errors import ConfigError, did_you_mean

__all__ = ["GRFTConfig", "STRUCTURES", "SCORES", "ConfigError", "resolve_config", "coerce_numbers",
           "check_field_types", "check_range"]

STRUCTURES = ("row", "column", "sparse")
# the importance scores of grft_vision.selection.salience
SCORES = ("grft", "gradient", "magnitude", "snip", "force", "taylor_fo", "synflow", "grasp", "fisher", "d3",
           "gem", "random")


@dataclass
class GRFTConfig:
    """Options of :func:`grft_vision.apply_grft` and of the training scripts built on it."""

    # --- what changes inside each targeted weight -------------------------------------------------
    structure: str = field(
        default="row",
        metadata={"help": "Shape of the update: 'row' (k output rows / output channels), 'column' "
                          "(k input columns / input channels) or 'sparse' (GPS: top-k entries of every row)."},
    )
    k: int | float = field(
        default=1,
        metadata={"help": "Rows, columns or per-row entries per weight: an int >= 1, or a float in (0, 1) "
                          "read as a fraction of the dimension (rounded half up, at least 1)."},
    )
    conv_columns: str = field(
        default="channel",
        metadata={"help": "What a column of a convolution is: 'channel' (an input channel with all its taps) or "
                          "'tap' (a column of the [out, in*kh*kw] view, as GPS and the GRFT paper's budgets)."},
    )
    budget: str = field(
        default="uniform",
        metadata={"help": "How units are shared between layers: uniform (k per layer), global (SPEFT: best "
                          "score per parameter across the model) or entropy (GEM: by the entropy of each layer's "
                          "weights). See grft_vision.selection.budget."},
    )
    budget_params: int | None = field(
        default=None, metadata={"help": "Total parameter budget of global/entropy budgets (default: what k spends)."},
    )
    budget_fraction: float | None = field(
        default=None, metadata={"help": "Total budget as a fraction of the targeted weights' parameters."},
    )
    entropy_bins: int = field(default=256, metadata={"help": "Histogram bins of the entropy budget."})
    clamp_k: bool = field(
        default=False,
        metadata={"help": "Clamp k to a layer's dimension instead of raising when k is larger."},
    )
    # --- which layers are targeted ----------------------------------------------------------------
    target_modules: list[str] = field(
        default_factory=lambda: ["*"],
        metadata={"help": "Glob patterns (fnmatch) on module names; every nn.Linear / nn.Conv2d that "
                          "matches one is targeted."},
    )
    exclude_modules: list[str] = field(
        default_factory=list,
        metadata={"help": "Glob patterns of module names never targeted (applied after target_modules)."},
    )
    head_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Module names (globs) of the classification head. None: timm's "
                          "pretrained_cfg['classifier'], else a top-level 'head'/'classifier'/'score'/'fc'."},
    )
    # --- which other tensors train fully (GRFT/GPS convention by default) ---------------------------
    train_head: bool = field(default=True, metadata={"help": "Train the classification head fully."})
    train_bias: bool = field(default=True, metadata={"help": "Train the biases of targeted layers fully."})
    train_norm: bool = field(default=False, metadata={"help": "Train norm-layer weights and biases."})
    train_pos_embed: bool = field(default=False, metadata={"help": "Train position embeddings."})
    train_tokens: bool = field(default=False, metadata={"help": "Train class/register/distillation tokens."})
    train_layer_scale: bool = field(default=True, metadata={"help": "Train LayerScale gammas fully."})
    extra_trainable: list[str] = field(
        default_factory=list,
        metadata={"help": "Glob patterns of parameter names to train fully in addition to the rules above."},
    )
    autocast_adapter_dtype: bool = field(
        default=True,
        metadata={"help": "Keep the adapter's trained tensors fp32 when the model's weights are (or are cast to) "
                          "bf16/fp16, casting them where used (PEFT's autocast_adapter_dtype); False: follow the "
                          "model's dtype."},
    )
    # --- selection: SupCon gradients on the lowest-loss subset (paper Alg. 1, §4.4.6) -------------
    score: str = field(
        default="grft",
        metadata={"help": "Per-parameter importance: grft (squared gradient, the paper), gradient, magnitude, "
                          "snip, force, taylor_fo, synflow, grasp, fisher (SPEFT), d3 (ID3), gem (gradient-to-"
                          "weight ratio), random. See grft_vision.selection.salience."},
    )
    selection_loss: str = field(
        default="supcon",
        metadata={"help": "Loss whose gradients score parameters: supcon (pre-logits features, the paper) or "
                          "cross_entropy (the task loss through the head)."},
    )
    d3_eps: float = field(default=1.0, metadata={"help": "ID3's epsilon in |g| / (|theta| + eps)^exp."})
    d3_exp: float = field(default=2.0, metadata={"help": "ID3's exponent in |g| / (|theta| + eps)^exp."})
    schedule: str = field(
        default="static",
        metadata={"help": "When the chosen entries change: static (chosen once), dynamic (SPEFT: re-chosen every "
                          "schedule_interval steps) or incremental (ID3: unmasked step by step up to the budget)."},
    )
    schedule_interval: int = field(default=100, metadata={"help": "Optimizer steps between schedule events."})
    schedule_batches: int = field(default=4, metadata={"help": "Batches of training data scored at each event."})
    temperature: float = field(default=0.07, metadata={"help": "SupCon temperature."})
    selection_views: int = field(
        default=2,
        metadata={"help": "Augmented views per image in the selection loss: 2 (GPS contrastive protocol) or 1."},
    )
    num_subsets: int = field(
        default=1,
        metadata={"help": "Split the training set into n random subsets and compute the gradient on the "
                          "lowest-loss one ('Data Subsets Number'); 1 uses all data."},
    )
    selection_mode: str = field(
        default="train",
        metadata={"help": "Model mode during selection: 'train' (as the GPS code: dropout/drop-path active, "
                          "BatchNorm on batch statistics, running statistics restored afterwards) or 'eval'."},
    )
    selection_batch_size: int | None = field(
        default=None, metadata={"help": "Batch size of the selection passes; None: the loader's batch size."},
    )
    selection_seed: int = field(default=0, metadata={"help": "Seed of the subset split, shuffling and views."})
    # --- L2-to-pretrained regulariser (paper Eq. 8) -----------------------------------------------
    reg_lambda: float = field(
        default=0.0,
        metadata={"help": "lambda of the L2-to-pretrained penalty; 0 disables it."},
    )
    reg_blocks: int | str = field(
        default="all",
        metadata={"help": "Regularised set: the last L blocks/stages plus the stem (patch embedding) and "
                          "the head; an int L >= 0 or 'all' (every trainable tensor)."},
    )

    def __post_init__(self) -> None:
        for name in ("target_modules", "exclude_modules", "extra_trainable"):
            value = getattr(self, name)
            if isinstance(value, str):
                setattr(self, name, [value])
        if isinstance(self.head_modules, str):
            self.head_modules = [self.head_modules]
        _check_k(self.k)
        if not (self.reg_blocks == "all" or (isinstance(self.reg_blocks, int) and self.reg_blocks >= 0
                                             and not isinstance(self.reg_blocks, bool))):
            raise ConfigError(f"reg_blocks={self.reg_blocks!r} must be an int >= 0 or 'all'.")
        check_field_types(self)
        if self.structure not in STRUCTURES:
            raise ConfigError(f"structure={self.structure!r} is not known; use one of {', '.join(STRUCTURES)}.")
        if self.conv_columns not in ("channel", "tap"):
            raise ConfigError(f"conv_columns={self.conv_columns!r} must be 'channel' or 'tap'.")
        if self.budget not in ("uniform", "global", "entropy"):
            raise ConfigError(f"budget={self.budget!r} must be 'uniform', 'global' or 'entropy'.")
        if self.budget_params is not None and self.budget_fraction is not None:
            raise ConfigError("set budget_params or budget_fraction, not both.")
        if self.budget_fraction is not None and not 0 < self.budget_fraction <= 1:
            raise ConfigError(f"budget_fraction={self.budget_fraction!r} must be in (0, 1].")
        check_range(self, "budget_params", low=1)
        check_range(self, "entropy_bins", low=2)
        check_range(self, "d3_eps", low=0, low_open=True)
        check_range(self, "selection_batch_size", low=1)
        check_range(self, "selection_seed", low=0)
        if self.score not in SCORES:
            raise ConfigError(f"score={self.score!r} is not known; use one of {', '.join(SCORES)}.")
        if self.selection_loss not in ("supcon", "cross_entropy"):
            raise ConfigError(f"selection_loss={self.selection_loss!r} must be 'supcon' or 'cross_entropy'.")
        if self.schedule not in ("static", "dynamic", "incremental"):
            raise ConfigError(f"schedule={self.schedule!r} must be 'static', 'dynamic' or 'incremental'.")
        check_range(self, "schedule_interval", low=1)
        check_range(self, "schedule_batches", low=1)
        if self.selection_views not in (1, 2):
            raise ConfigError(f"selection_views={self.selection_views!r} must be 1 or 2.")
        if self.selection_mode not in ("train", "eval"):
            raise ConfigError(f"selection_mode={self.selection_mode!r} must be 'train' or 'eval'.")
        check_range(self, "num_subsets", low=1)
        check_range(self, "temperature", low=0, low_open=True)
        check_range(self, "reg_lambda", low=0)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "GRFTConfig":
        """Build a config from a mapping; an unknown key raises :class:`ConfigError` naming it."""
        known = {f.name for f in dataclasses.fields(cls)}
        for key in values:
            if key not in known:
                raise ConfigError(f"unknown GRFT config key {key!r}.{did_you_mean(key, known)} "
                                  f"Valid keys: {', '.join(sorted(known))}.")
        return cls(**coerce_numbers(cls, values))

    @classmethod
    def from_yaml(cls, path: str | Path) -> "GRFTConfig":
        """Read a config from a YAML file holding a mapping of field names to values."""
        with open(path, encoding="utf-8") as handle:
            values = yaml.safe_load(handle) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping of GRFT config keys, got {type(values).__name__}.")
        return cls.from_dict(values)

    def layer_structure(self, layer: Any) -> str:
        """The structure one layer gets: ``structure``, or 'tap_column' for convolution columns by tap."""
        is_conv = hasattr(layer, "kernel_size")
        return "tap_column" if self.structure == "column" and self.conv_columns == "tap" and is_conv else self.structure

    def to_dict(self) -> dict[str, Any]:
        """The config as plain Python values (JSON/YAML serialisable)."""
        return dataclasses.asdict(self)


def _check_k(k: Any) -> None:
    is_count = isinstance(k, int) and not isinstance(k, bool) and k >= 1
    is_fraction = isinstance(k, float) and 0.0 < k < 1.0
    if not (is_count or is_fraction):
        raise ConfigError(f"k={k!r} must be an int >= 1 (a count) or a float in (0, 1) (a fraction of the dimension).")


def resolve_config(config: GRFTConfig | Mapping[str, Any] | None) -> GRFTConfig:
    """Accept a :class:`GRFTConfig`, a plain mapping of its fields, or None (the defaults)."""
    if config is None:
        return GRFTConfig()
    if isinstance(config, GRFTConfig):
        return config
    return GRFTConfig.from_dict(config)


def coerce_numbers(cls: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """Read numbers that YAML left as strings (PyYAML parses ``1e-3`` as a string) for numeric fields.

    Raises:
        ConfigError: a numeric field holds text that is not a number.
    """
    types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    coerced = dict(values)
    for key, value in values.items():
        if not isinstance(value, str) or "float" not in types.get(key, ""):
            continue
        try:
            coerced[key] = float(value)
        except ValueError:
            if "str" not in types[key]:
                raise ConfigError(f"{key}={value!r} must be a number.") from None
    return coerced


# the type names a field's annotation may combine with "|", and what a value of each looks like
_KINDS = {
    "int": ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "float": ("a finite number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
              and math.isfinite(v)),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "str": ("a string", lambda v: isinstance(v, str)),
    "None": ("null", lambda v: v is None),
    "list[str]": ("a list of strings", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)),
    "list[float]": ("a list of finite numbers", lambda v: isinstance(v, list) and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)),
}


def check_field_types(config: Any) -> None:
    """Check every field of a settings dataclass against its annotation (``int``, ``float | None``, ...).

    ``True`` is not an integer, ``1.5`` is not an integer, NaN and inf are not numbers; an int is a valid
    float. Annotations other than those of ``_KINDS`` are not checked.

    Raises:
        ConfigError: naming the field, its value and the type it needs, e.g. ``seed=1.5 must be an integer.``
    """
    for item in dataclasses.fields(config):
        kinds = [part.strip() for part in str(item.type).split("|")]
        if not all(kind in _KINDS for kind in kinds):
            continue
        value = getattr(config, item.name)
        if not any(_KINDS[kind][1](value) for kind in kinds):
            wanted = " or ".join(_KINDS[kind][0] for kind in kinds)
            raise ConfigError(f"{item.name}={value!r} must be {wanted}.")


def check_range(config: Any, name: str, *, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False) -> None:
    """Check that the number ``config.<name>`` lies in a range (None values are not checked).

    Raises:
        ConfigError: ``name=value must be in [low, high)`` (the bounds that apply).
    """
    value = getattr(config, name)
    if value is None:
        return
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        if high is None:
            wanted = f"{'>' if low_open else '>='} {low}"
        elif low is None:
            wanted = f"{'<' if high_open else '<='} {high}"
        else:
            wanted = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ConfigError(f"{name}={value!r} must be {wanted}.")
