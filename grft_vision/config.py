"""The configuration of a GRFT adapter: which weights adapt, how, what else trains, and how entries are chosen.

:class:`GRFTConfig` holds what every adapter needs (structure, k, targets, the trainable set, the
regulariser) and, as nested dataclasses in the manner of PEFT's ``LoraConfig.eva_config``, the options of
three optional mechanisms: :class:`SelectionConfig` (how parameters are scored), :class:`BudgetConfig` (how
units are shared between layers) and :class:`ScheduleConfig` (whether the chosen entries change during
training). The flat names of earlier versions are still accepted everywhere — as keyword arguments
(``GRFTConfig(score="fisher", schedule="dynamic")``), in YAML files and ``--set`` — and readable as
attributes (``config.temperature``); :meth:`GRFTConfig.to_dict` writes the flat form, which config files,
``config.yaml`` of a run and adapter files store.

Every option is validated when the config is built; an unknown key is an error naming the closest valid one.
Structure and score names are checked against their registries (:mod:`grft_vision.tuner.structures`,
:mod:`grft_vision.selection.scores`), so a structure or score registered by a user is a valid value.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from .errors import ConfigError, did_you_mean

__all__ = ["GRFTConfig", "SelectionConfig", "BudgetConfig", "ScheduleConfig", "FLAT_OPTIONS", "BUDGETS",
           "SCHEDULES", "ConfigError", "resolve_config", "coerce_numbers", "check_field_types", "check_range"]

BUDGETS = ("uniform", "global", "entropy")
SCHEDULES = ("static", "dynamic", "incremental")


@dataclass
class SelectionConfig:
    """How parameters are scored before training (and at the events of a schedule)."""

    score: str = field(
        default="grft",
        metadata={"help": "Per-parameter importance: grft (squared gradient, the paper), gradient, magnitude, snip, "
                          "force, taylor_fo, synflow, grasp, fisher (SPEFT), d3 (ID3), gem (gradient-to-weight "
                          "ratio), random, or a score registered in grft_vision.selection.scores."},
    )
    loss: str = field(
        default="supcon",
        metadata={"help": "Loss whose gradients score parameters: supcon (pre-logits features, the paper) or "
                          "cross_entropy (the task loss through the head)."},
    )
    temperature: float = field(default=0.07, metadata={"help": "SupCon temperature."})
    views: int = field(
        default=2,
        metadata={"help": "Augmented views per image in the selection loss: 2 (GPS contrastive protocol) or 1."},
    )
    num_subsets: int = field(
        default=1,
        metadata={"help": "Split the training set into n random subsets and compute the gradient on the lowest-loss "
                          "one ('Data Subsets Number'); 1 uses all data."},
    )
    mode: str = field(
        default="train",
        metadata={"help": "Model mode during selection: 'train' (as the GPS code: dropout/drop-path active, "
                          "BatchNorm on batch statistics, running statistics untouched) or 'eval'."},
    )
    batch_size: int | None = field(
        default=None, metadata={"help": "Batch size of the selection passes; None: the loader's batch size."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the subset split, shuffling and views."})
    d3_eps: float = field(default=1.0, metadata={"help": "ID3's epsilon in |g| / (|theta| + eps)^exp."})
    d3_exp: float = field(default=2.0, metadata={"help": "ID3's exponent in |g| / (|theta| + eps)^exp."})

    def __post_init__(self) -> None:
        check_field_types(self)
        from .selection.losses import SELECTION_LOSSES
        from .selection.scores import SCORES

        SCORES.get(self.score)
        SELECTION_LOSSES.get(self.loss)
        if self.views not in (1, 2):
            raise ConfigError(f"selection_views={self.views!r} must be 1 or 2.")
        if self.mode not in ("train", "eval"):
            raise ConfigError(f"selection_mode={self.mode!r} must be 'train' or 'eval'.")
        check_range(self, "temperature", low=0, low_open=True)
        check_range(self, "num_subsets", low=1)
        check_range(self, "batch_size", low=1)
        check_range(self, "seed", low=0)
        check_range(self, "d3_eps", low=0, low_open=True)


@dataclass
class BudgetConfig:
    """How units (rows, columns, per-row entries) are shared between layers (``grft_vision.selection.budget``)."""

    kind: str = field(
        default="uniform",
        metadata={"help": "uniform (k per layer), global (SPEFT: best score per parameter across the model) or "
                          "entropy (GEM: by the entropy of each layer's weights)."},
    )
    params: int | None = field(
        default=None, metadata={"help": "Total parameter budget of global/entropy budgets (default: what k spends)."},
    )
    fraction: float | None = field(
        default=None, metadata={"help": "Total budget as a fraction of the targeted weights' parameters."},
    )
    entropy_bins: int = field(default=256, metadata={"help": "Histogram bins of the entropy budget."})

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.kind not in BUDGETS:
            raise ConfigError(f"budget={self.kind!r} must be one of {', '.join(BUDGETS)}.{did_you_mean(self.kind, BUDGETS)}")
        if self.params is not None and self.fraction is not None:
            raise ConfigError("set budget_params or budget_fraction, not both.")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise ConfigError(f"budget_fraction={self.fraction!r} must be in (0, 1].")
        check_range(self, "params", low=1)
        check_range(self, "entropy_bins", low=2)


@dataclass
class ScheduleConfig:
    """When the chosen entries change during training (``grft_vision.selection.schedules``)."""

    kind: str = field(
        default="static",
        metadata={"help": "static (chosen once), dynamic (SPEFT: re-chosen every schedule_interval steps) or "
                          "incremental (ID3: unmasked step by step up to the budget)."},
    )
    interval: int = field(default=100, metadata={"help": "Optimizer steps between schedule events."})
    batches: int = field(default=4, metadata={"help": "Batches of training data scored at each event."})

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.kind not in SCHEDULES:
            raise ConfigError(f"schedule={self.kind!r} must be one of {', '.join(SCHEDULES)}."
                              f"{did_you_mean(self.kind, SCHEDULES)}")
        check_range(self, "interval", low=1)
        check_range(self, "batches", low=1)


# the flat option names of GRFTConfig -> (nested config field, field of that config)
FLAT_OPTIONS: dict[str, tuple[str, str]] = {
    "score": ("selection_config", "score"),
    "selection_loss": ("selection_config", "loss"),
    "temperature": ("selection_config", "temperature"),
    "selection_views": ("selection_config", "views"),
    "num_subsets": ("selection_config", "num_subsets"),
    "selection_mode": ("selection_config", "mode"),
    "selection_batch_size": ("selection_config", "batch_size"),
    "selection_seed": ("selection_config", "seed"),
    "d3_eps": ("selection_config", "d3_eps"),
    "d3_exp": ("selection_config", "d3_exp"),
    "budget": ("budget_config", "kind"),
    "budget_params": ("budget_config", "params"),
    "budget_fraction": ("budget_config", "fraction"),
    "entropy_bins": ("budget_config", "entropy_bins"),
    "schedule": ("schedule_config", "kind"),
    "schedule_interval": ("schedule_config", "interval"),
    "schedule_batches": ("schedule_config", "batches"),
}
_NESTED = {"selection_config": SelectionConfig, "budget_config": BudgetConfig, "schedule_config": ScheduleConfig}


def _flat_property(name: str) -> property:
    group, key = FLAT_OPTIONS[name]

    def get(self: "GRFTConfig") -> Any:
        return getattr(getattr(self, group), key)

    def set_(self: "GRFTConfig", value: Any) -> None:
        nested = getattr(self, group)
        setattr(self, group, dataclasses.replace(nested, **{key: value}))

    return property(get, set_, doc=f"``{group}.{key}`` under its flat name.")


@dataclass(init=False)
class GRFTConfig:
    """Options of :func:`grft_vision.apply_grft` and of the training scripts built on it.

    Every field below is a keyword argument; so are the flat names of the nested options
    (:data:`FLAT_OPTIONS`: ``score``, ``selection_loss``, ``temperature``, ``selection_views``, ``num_subsets``,
    ``selection_mode``, ``selection_batch_size``, ``selection_seed``, ``d3_eps``, ``d3_exp``, ``budget``,
    ``budget_params``, ``budget_fraction``, ``entropy_bins``, ``schedule``, ``schedule_interval``,
    ``schedule_batches``), which fill ``selection_config``, ``budget_config`` and ``schedule_config``.
    """

    # --- what changes inside each targeted weight -------------------------------------------------
    structure: str = field(
        default="row",
        metadata={"help": "Shape of the update: 'row' (k output rows / output channels), 'column' (k input columns "
                          "/ input channels), 'sparse' (GPS: top-k entries of every row), or a structure registered "
                          "in grft_vision.tuner.structures."},
    )
    k: int | float = field(
        default=1,
        metadata={"help": "Rows, columns or per-row entries per weight: an int >= 1, or a float in (0, 1) read as a "
                          "fraction of the dimension (rounded half up, at least 1)."},
    )
    conv_columns: str = field(
        default="channel",
        metadata={"help": "What a column of a convolution is: 'channel' (an input channel with all its taps) or "
                          "'tap' (a column of the [out, in*kh*kw] view, as GPS and the GRFT paper's budgets)."},
    )
    clamp_k: bool = field(
        default=False, metadata={"help": "Clamp k to a layer's dimension instead of raising when k is larger."},
    )
    # --- which layers are targeted ----------------------------------------------------------------
    target_modules: list[str] = field(
        default_factory=lambda: ["*"],
        metadata={"help": "Glob patterns (fnmatch) on module names; every nn.Linear / nn.Conv2d that matches one "
                          "is targeted."},
    )
    exclude_modules: list[str] = field(
        default_factory=list,
        metadata={"help": "Glob patterns of module names never targeted (applied after target_modules)."},
    )
    head_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Module names (globs) of the classification head. None: timm's pretrained_cfg['classifier'], "
                          "else a top-level 'head'/'classifier'/'score'/'fc'."},
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
    # --- L2-to-pretrained regulariser (paper Eq. 8) -----------------------------------------------
    reg_lambda: float = field(default=0.0, metadata={"help": "lambda of the L2-to-pretrained penalty; 0 disables it."})
    reg_blocks: int | str = field(
        default="all",
        metadata={"help": "Regularised set: the last L blocks/stages plus the stem (patch embedding) and the head; "
                          "an int L >= 0 or 'all' (every trainable tensor)."},
    )
    # --- nested options ------------------------------------------------------------------------------
    selection_config: SelectionConfig = field(default_factory=SelectionConfig,
                                              metadata={"help": "How parameters are scored."})
    budget_config: BudgetConfig = field(default_factory=BudgetConfig,
                                        metadata={"help": "How units are shared between layers."})
    schedule_config: ScheduleConfig = field(default_factory=ScheduleConfig,
                                            metadata={"help": "When the chosen entries change."})

    def __init__(self, **options: Any) -> None:
        fields = {item.name: item for item in dataclasses.fields(self)}
        unknown = [key for key in options if key not in fields and key not in FLAT_OPTIONS]
        if unknown:
            known = [*fields, *FLAT_OPTIONS]
            raise ConfigError(f"unknown GRFT config key {unknown[0]!r}.{did_you_mean(unknown[0], known)} "
                              f"Valid keys: {', '.join(sorted(known))}.")
        for name, item in fields.items():
            if name in options:
                value = options[name]
            else:
                value = item.default_factory() if item.default_factory is not dataclasses.MISSING else item.default
            object.__setattr__(self, name, value)
        groups: dict[str, dict[str, Any]] = {}
        for key, value in options.items():
            if key in FLAT_OPTIONS:
                group, name = FLAT_OPTIONS[key]
                groups.setdefault(group, {})[name] = value
        for group, values in groups.items():
            current = getattr(self, group)
            if not isinstance(current, _NESTED[group]):
                break  # reported below
            nested = dataclasses.asdict(current)
            nested.update(values)
            object.__setattr__(self, group, _NESTED[group](**nested))
        self.__post_init__()

    def __post_init__(self) -> None:
        for name in ("target_modules", "exclude_modules", "extra_trainable"):
            value = getattr(self, name)
            if isinstance(value, str):
                setattr(self, name, [value])
        if isinstance(self.head_modules, str):
            self.head_modules = [self.head_modules]
        for group, cls in _NESTED.items():
            value = getattr(self, group)
            if isinstance(value, Mapping):
                setattr(self, group, cls(**value))
            elif not isinstance(value, cls):
                raise ConfigError(f"{group} must be a {cls.__name__} (or a mapping of its fields), not "
                                  f"{type(value).__name__}.")
        _check_k(self.k)
        if not (self.reg_blocks == "all" or (isinstance(self.reg_blocks, int) and self.reg_blocks >= 0
                                             and not isinstance(self.reg_blocks, bool))):
            raise ConfigError(f"reg_blocks={self.reg_blocks!r} must be an int >= 0 or 'all'.")
        check_field_types(self)
        from .tuner.structures import STRUCTURES

        STRUCTURES.get(self.structure)
        if self.conv_columns not in ("channel", "tap"):
            raise ConfigError(f"conv_columns={self.conv_columns!r} must be 'channel' or 'tap'.")
        check_range(self, "reg_lambda", low=0)

    # the flat names, readable and writable as attributes
    score = _flat_property("score")
    selection_loss = _flat_property("selection_loss")
    temperature = _flat_property("temperature")
    selection_views = _flat_property("selection_views")
    num_subsets = _flat_property("num_subsets")
    selection_mode = _flat_property("selection_mode")
    selection_batch_size = _flat_property("selection_batch_size")
    selection_seed = _flat_property("selection_seed")
    d3_eps = _flat_property("d3_eps")
    d3_exp = _flat_property("d3_exp")
    budget = _flat_property("budget")
    budget_params = _flat_property("budget_params")
    budget_fraction = _flat_property("budget_fraction")
    entropy_bins = _flat_property("entropy_bins")
    schedule = _flat_property("schedule")
    schedule_interval = _flat_property("schedule_interval")
    schedule_batches = _flat_property("schedule_batches")

    @classmethod
    def keys(cls) -> list[str]:
        """Every key :meth:`from_dict` accepts in the flat form: the fields and the flat option names."""
        return [item.name for item in dataclasses.fields(cls) if item.name not in _NESTED] + list(FLAT_OPTIONS)

    @classmethod
    def help_text(cls, key: str) -> str:
        """The help text of a flat key (a field's, or the nested field's it stands for)."""
        if key in FLAT_OPTIONS:
            group, name = FLAT_OPTIONS[key]
            return _NESTED[group].__dataclass_fields__[name].metadata.get("help", "")
        item = cls.__dataclass_fields__.get(key)
        return item.metadata.get("help", "") if item is not None else ""

    @classmethod
    def default_of(cls, key: str) -> Any:
        """The default value of a flat key."""
        return cls().to_dict()[key]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "GRFTConfig":
        """Build a config from a flat mapping (or one with nested ``selection_config`` / ``budget_config`` /
        ``schedule_config`` mappings); an unknown key raises :class:`ConfigError` naming it."""
        types = {name: str(f.type) for name, f in cls.__dataclass_fields__.items()}
        for key, (group, name) in FLAT_OPTIONS.items():
            types[key] = str(_NESTED[group].__dataclass_fields__[name].type)
        return cls(**coerce_numbers(types, values))

    @classmethod
    def from_yaml(cls, path: str | Path) -> "GRFTConfig":
        """Read a config from a YAML file holding a mapping of keys to values."""
        with open(path, encoding="utf-8") as handle:
            values = yaml.safe_load(handle) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping of GRFT config keys, got {type(values).__name__}.")
        return cls.from_dict(values)

    def layer_structure(self, layer: Any) -> str:
        """The structure one layer gets (e.g. 'tap_column' for a convolution's columns by tap), as its
        structure class decides (:meth:`~grft_vision.tuner.structures.Update.for_layer`)."""
        from .tuner.structures import STRUCTURES

        return STRUCTURES.get(self.structure).for_layer(layer, self)

    def to_dict(self) -> dict[str, Any]:
        """The config as a flat mapping of plain Python values (what YAML files and adapter files hold)."""
        flat = {name: value for name, value in dataclasses.asdict(self).items() if name not in _NESTED}
        flat.update({key: getattr(self, key) for key in FLAT_OPTIONS})
        return flat


def _check_k(k: Any) -> None:
    is_count = isinstance(k, int) and not isinstance(k, bool) and k >= 1
    is_fraction = isinstance(k, float) and 0.0 < k < 1.0
    if not (is_count or is_fraction):
        raise ConfigError(f"k={k!r} must be an int >= 1 (a count) or a float in (0, 1) (a fraction of the dimension).")


def resolve_config(config: GRFTConfig | Mapping[str, Any] | None) -> GRFTConfig:
    """Accept a :class:`GRFTConfig`, a plain mapping of its keys, or None (the defaults)."""
    if config is None:
        return GRFTConfig()
    if isinstance(config, GRFTConfig):
        return config
    return GRFTConfig.from_dict(config)


def coerce_numbers(types: type | Mapping[str, str], values: Mapping[str, Any]) -> dict[str, Any]:
    """Read numbers that YAML left as strings (PyYAML parses ``1e-3`` as a string) for numeric keys.

    Args:
        types: a dataclass (its fields' annotations) or a mapping of key -> annotation text.
        values: the raw values.

    Raises:
        ConfigError: a numeric key holds text that is not a number.
    """
    if not isinstance(types, Mapping):
        types = {f.name: str(f.type) for f in dataclasses.fields(types)}
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
# the flat name of a nested field, for messages (SelectionConfig.loss is selection_loss to a user)
_FLAT_NAME = {(_NESTED[group], name): flat for flat, (group, name) in FLAT_OPTIONS.items()}


def check_field_types(config: Any) -> None:
    """Check every field of a settings dataclass against its annotation (``int``, ``float | None``, ...).

    ``True`` is not an integer, ``1.5`` is not an integer, NaN and inf are not numbers; an int is a valid
    float. Annotations other than those of ``_KINDS`` are not checked.

    Raises:
        ConfigError: naming the field (by its flat name for nested options), its value and the type it needs,
            e.g. ``seed=1.5 must be an integer.``
    """
    for item in dataclasses.fields(config):
        kinds = [part.strip() for part in str(item.type).split("|")]
        if not all(kind in _KINDS for kind in kinds):
            continue
        value = getattr(config, item.name)
        if not any(_KINDS[kind][1](value) for kind in kinds):
            wanted = " or ".join(_KINDS[kind][0] for kind in kinds)
            name = _FLAT_NAME.get((type(config), item.name), item.name)
            raise ConfigError(f"{name}={value!r} must be {wanted}.")


def check_range(config: Any, name: str, *, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False) -> None:
    """Check that the number ``config.<name>`` lies in a range (None values are not checked).

    Raises:
        ConfigError: ``name=value must be in [low, high)`` (the bounds that apply; nested options by their flat name).
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
        shown = _FLAT_NAME.get((type(config), name), name)
        raise ConfigError(f"{shown}={value!r} must be {wanted}.")
