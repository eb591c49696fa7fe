"""The settings of a GLUE run: :class:`TrainConfig` plus what a language model needs.

The added fields are settings like any other (config files, ``--set``, flags): sequence length and
truncation, weight precision, gradient checkpointing, the pooled token, the pad token, and a learning-rate
schedule stepped per optimizer update with an in-run warm-up (``warmup_ratio``), and FSDP2 sharding of the
frozen base (``fsdp``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..config import ConfigError
from ..training.config import TrainConfig
from ..training.methods import METHODS
from .data import GLUE_LAYOUTS

__all__ = ["GlueTrainConfig", "DTYPES", "POOLINGS"]

DTYPES = ("auto", "bfloat16", "float16", "float32")
POOLINGS = ("auto", "last", "first")


@dataclass
class GlueTrainConfig(TrainConfig):
    """Settings of ``train_glue.py``: the shared run settings with language-model defaults and fields."""

    # --- shared settings, language-model defaults ------------------------------------------------------
    dataset: str = field(default="cola", metadata={"help": "GLUE task: cola, mrpc or rte."})
    data_dir: str | None = field(default=None, metadata={
        "help": "Folder with GLUE's TSV files (DIR/CoLA/train.tsv, dev.tsv) or JSON lines; None: Hugging Face "
                "datasets (online or cached)."})
    layout: str = field(default="auto", metadata={"help": "GLUE data layout: auto, tsv, jsonl or hf."})
    train_split: str = field(default="train", metadata={"help": "Split to train (and select) on."})
    eval_split: str = field(default="dev", metadata={"help": "Split to evaluate on (GLUE's test sets are unlabelled)."})
    workers: int = field(default=0, metadata={"help": "DataLoader worker processes (the data is in memory)."})
    model: str = field(default="meta-llama/Llama-3.2-1B", metadata={
        "help": "Hugging Face model id or local folder (AutoModelForSequenceClassification); causal or encoder LM."})
    opt: str = field(default="adamw", metadata={"help": "timm optimizer name (the paper: AdamW)."})
    lr: float = field(default=1e-4, metadata={"help": "Peak learning rate."})
    batch_size: int = field(default=16, metadata={"help": "Global batch size (split over processes)."})
    epochs: int = field(default=3, metadata={"help": "Training epochs (warm-up included when warmup_ratio > 0)."})
    warmup_epochs: int = field(default=0, metadata={"help": "Warm-up epochs added before --epochs (0: use warmup_ratio)."})
    warmup_lr: float = field(default=0.0, metadata={"help": "Learning rate at the start of warm-up."})
    min_lr: float = field(default=0.0, metadata={"help": "Learning rate at the end of the decay."})
    sched: str = field(default="linear", metadata={"help": "linear, or a timm scheduler name (cosine, ...)."})
    eval_every: int = field(default=1, metadata={"help": "Evaluate every N epochs (and at the end)."})
    # --- language-model settings ---------------------------------------------------------------------
    max_length: int = field(default=256, metadata={"help": "Longest tokenised sequence (special tokens included)."})
    truncation: bool = field(default=True, metadata={
        "help": "Truncate longer examples to max_length (a warning counts them); false: refuse them."})
    dtype: str = field(default="auto", metadata={
        "help": "Weight precision: auto (bfloat16 on CUDA with bf16 support, else float32), bfloat16, float16, "
                "float32. Trained updates and the head stay float32."})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "Recompute layer activations in the backward pass (less memory, about a third more compute)."})
    pooling: str = field(default="auto", metadata={
        "help": "Token whose final hidden state represents a sequence in selection: last (last non-padding "
                "token, causal LMs), first (encoders' [CLS]) or auto (by model type)."})
    pad_token: str | None = field(default=None, metadata={
        "help": "Token to pad with when the tokenizer has none; None: its EOS token (Llama)."})
    sched_on_updates: bool = field(default=True, metadata={
        "help": "Step the learning-rate schedule after every optimizer update instead of every epoch."})
    warmup_ratio: float = field(default=0.06, metadata={
        "help": "Linear warm-up over this share of the training updates (needs sched_on_updates, warmup_epochs=0)."})
    fsdp: bool = field(default=False, metadata={
        "help": "Under torchrun, shard the frozen base over the processes with FSDP2 (fully_shard) instead of "
                "replicating it (DDP); the adapter and the head stay whole on every process."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layout not in GLUE_LAYOUTS:
            raise ConfigError(f"layout={self.layout!r} is not a GLUE layout; use one of {', '.join(GLUE_LAYOUTS)}.")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype={self.dtype!r} is not known; use one of {', '.join(DTYPES)}.")
        if self.pooling not in POOLINGS:
            raise ConfigError(f"pooling={self.pooling!r} is not known; use one of {', '.join(POOLINGS)}.")
        if not (isinstance(self.max_length, int) and self.max_length >= 2):
            raise ConfigError(f"max_length={self.max_length!r} must be an int >= 2.")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"warmup_ratio={self.warmup_ratio!r} must be in [0, 1).")
        if self.fsdp and METHODS.get(self.method).trains_base:
            raise ConfigError(f"fsdp=true shards the frozen base of a run; --method {self.method} trains the base's "
                              "weights: run it with torchrun without --fsdp (DDP).")
        if self.warmup_ratio > 0 and (self.warmup_epochs > 0 or not self.sched_on_updates):
            raise ConfigError("warmup_ratio > 0 is a warm-up counted in updates inside --epochs: it needs "
                              "sched_on_updates=true and warmup_epochs=0 (set warmup_ratio=0 to use warmup_epochs).")
