"""GLUE data for the language-model path: CoLA, MRPC and RTE from GLUE's own files or Hugging Face.

Sources, by ``layout``:

- ``tsv``: GLUE's distribution (``DIR/CoLA/train.tsv``, ``DIR/CoLA/dev.tsv``, ...). CoLA has no header
  (columns: source, label, original-label mark, sentence); MRPC has the header ``Quality #1 ID #2 ID
  #1 String #2 String``; RTE the header ``index sentence1 sentence2 label`` with the labels
  ``entailment`` / ``not_entailment``.
- ``jsonl``: one JSON object per line with the field names of the Hugging Face ``glue`` dataset
  (``sentence`` or ``sentence1``/``sentence2``, and ``label`` as a number or a label name).
- ``hf``: ``datasets.load_dataset("nyu-mll/glue", task)`` (needs the ``datasets`` package and network or
  its cache); ``dev`` is Hugging Face's ``validation`` split.
- ``auto``: ``hf`` without ``data_dir``, else whichever of ``<split>.tsv`` / ``<split>.jsonl`` exists in
  ``DIR/<GLUE folder>/``, ``DIR/<task>/`` or ``DIR/``.

Labels follow the Hugging Face ``glue`` convention (CoLA 1 = acceptable, MRPC 1 = equivalent, RTE
0 = entailment). GLUE's test sets are unlabelled, so runs evaluate on ``dev`` (the paper reports dev-set
numbers). A :class:`GlueDataset` holds the texts; :func:`tokenize_dataset` adds token ids once the tokenizer
is known, and :class:`PadCollate` pads each batch to its longest sequence.
"""
from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import Dataset

from ..data.errors import DataNotFoundError
from ..errors import ConfigError

__all__ = ["GlueTaskInfo", "GLUE_TASKS", "GLUE_TASK_NAMES", "GLUE_LAYOUTS", "GlueExample", "GlueDataset",
           "load_glue", "read_glue_tsv", "read_glue_jsonl", "tokenize_dataset", "PadCollate", "SequenceTooLongError"]

_logger = logging.getLogger(__name__)
GLUE_LAYOUTS = ("auto", "tsv", "jsonl", "hf")
_HF_DATASET = "nyu-mll/glue"
_SPLIT_ALIASES = {"dev": ("dev", "validation"), "validation": ("validation", "dev")}


class SequenceTooLongError(ConfigError):
    """A tokenised example is longer than ``max_length`` and truncation is off."""


@dataclass(frozen=True)
class GlueTaskInfo:
    """One GLUE task: where its files are, which fields hold the text, its labels and metrics.

    Attributes:
        name: the dataset name of the scripts (``cola``).
        folder: the folder of GLUE's distribution (``CoLA``).
        text_fields: Hugging Face field names of the text (one sentence, or a pair).
        label_names: label names, index = label id (Hugging Face ``glue`` order).
        metrics: evaluation metrics besides accuracy (``mcc``: Matthews correlation, ``f1``: F1 of class 1).
        tsv_columns: ``(number of columns, label column, text columns)`` of GLUE's TSV files.
        tsv_header: whether GLUE's train/dev TSV files start with a header row (a first row whose label
            column holds no label is taken as a header either way).
    """

    name: str
    folder: str
    text_fields: tuple[str, ...]
    label_names: tuple[str, ...]
    metrics: tuple[str, ...]
    tsv_columns: tuple[int, int, tuple[int, ...]]
    tsv_header: bool

    @property
    def num_classes(self) -> int:
        return len(self.label_names)


GLUE_TASKS: dict[str, GlueTaskInfo] = {
    "cola": GlueTaskInfo("cola", "CoLA", ("sentence",), ("unacceptable", "acceptable"), ("accuracy", "mcc"),
                         (4, 1, (3,)), False),
    "mrpc": GlueTaskInfo("mrpc", "MRPC", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"),
                         ("accuracy", "f1"), (5, 0, (3, 4)), True),
    "rte": GlueTaskInfo("rte", "RTE", ("sentence1", "sentence2"), ("entailment", "not_entailment"),
                        ("accuracy",), (4, 3, (1, 2)), True),
}
GLUE_TASK_NAMES = tuple(GLUE_TASKS)


@dataclass(frozen=True)
class GlueExample:
    """The text (one sentence or a pair) and the label id of one example."""

    texts: tuple[str, ...]
    label: int


class GlueDataset(Dataset):
    """Examples of one split of a GLUE task; items are token ids once :func:`tokenize_dataset` ran.

    An item is ``{"input_ids": [...], ("token_type_ids": [...],) "label": int, "index": int}`` where
    ``index`` is the example's position in this dataset (selection uses it to complete batches).
    """

    def __init__(self, task: str, split: str, examples: Sequence[GlueExample], source: str = "") -> None:
        self.task, self.split, self.source = GLUE_TASKS[task], split, source
        self.examples = list(examples)
        self.encodings: list[dict[str, list[int]]] | None = None

    @property
    def labels(self) -> list[int]:
        return [example.label for example in self.examples]

    @property
    def num_classes(self) -> int:
        return self.task.num_classes

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self.encodings is None:
            raise RuntimeError("GlueDataset items are token ids: call tokenize_dataset(dataset, tokenizer) first.")
        return {**self.encodings[index], "label": self.examples[index].label, "index": index}


def _label_id(value: Any, info: GlueTaskInfo, where: str) -> int:
    if isinstance(value, str) and value.strip() in info.label_names:
        return info.label_names.index(value.strip())
    try:
        label = int(str(value).strip())
    except ValueError:
        label = -2
    if label == -1:
        raise ValueError(f"{where}: the example has no label (label -1). GLUE's test sets are unlabelled; "
                         "evaluate on 'dev' (the paper reports dev-set numbers).")
    if not 0 <= label < info.num_classes:
        raise ValueError(f"{where}: label {value!r} is not one of {', '.join(info.label_names)} "
                         f"(or 0..{info.num_classes - 1}) for {info.name}.")
    return label


def _is_data_row(row: list[str], info: GlueTaskInfo) -> bool:
    columns, label_column, _ = info.tsv_columns
    if len(row) != columns:
        return False
    label = row[label_column].strip()
    return label in info.label_names or label.lstrip("-").isdigit()


def read_glue_tsv(path: str | Path, task: str) -> list[GlueExample]:
    """Examples of one GLUE TSV file (GLUE's own column layout of ``task``; see the module docstring).

    Raises:
        ValueError: a row with the wrong number of columns or an unknown label (the message names the line).
    """
    info = GLUE_TASKS[task]
    columns, label_column, text_columns = info.tsv_columns
    examples = []
    with open(path, encoding="utf-8", newline="") as handle:
        for line, row in enumerate(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE), start=1):
            if not row or row == [""]:
                continue
            where = f"{path}:{line}"
            if line == 1 and not _is_data_row(row, info):
                continue  # the header row (MRPC, RTE; tolerated for CoLA)
            if len(row) != columns:
                raise ValueError(f"{where}: expected {columns} tab-separated columns for {info.name} "
                                 f"(GLUE's {info.folder} format), found {len(row)}. GLUE's test files are "
                                 "unlabelled and have other columns; train on train.tsv, evaluate on dev.tsv.")
            examples.append(GlueExample(tuple(row[i] for i in text_columns), _label_id(row[label_column], info, where)))
    return examples


def read_glue_jsonl(path: str | Path, task: str) -> list[GlueExample]:
    """Examples of a JSON-lines file with the Hugging Face ``glue`` field names.

    Raises:
        ValueError: a line that is not a JSON object with the task's fields (the message names the line).
    """
    info = GLUE_TASKS[task]
    examples = []
    with open(path, encoding="utf-8") as handle:
        for line, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            where = f"{path}:{line}"
            try:
                row = json.loads(text)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not valid JSON ({error}).") from None
            missing = [name for name in (*info.text_fields, "label") if not isinstance(row, dict) or name not in row]
            if missing:
                raise ValueError(f"{where}: expected an object with the fields "
                                 f"{', '.join((*info.text_fields, 'label'))} for {info.name}; missing {', '.join(missing)}.")
            examples.append(GlueExample(tuple(str(row[name]) for name in info.text_fields),
                                        _label_id(row["label"], info, where)))
    return examples


def _candidates(data_dir: Path, info: GlueTaskInfo, split: str, extensions: Sequence[str]) -> list[Path]:
    folders = [data_dir / info.folder, data_dir / info.name, data_dir]
    names = _SPLIT_ALIASES.get(split, (split,))
    return [folder / f"{name}.{ext}" for folder in folders for name in names for ext in extensions]


def _missing_message(task: str, split: str, data_dir: Path, looked: list[Path]) -> str:
    info = GLUE_TASKS[task]
    return (f"no {split} data of GLUE {info.folder} under {str(data_dir)!r} (looked for "
            f"{', '.join(str(p) for p in looked[:4])}, ...). Put GLUE's files there as DIR/{info.folder}/train.tsv and "
            f"DIR/{info.folder}/dev.tsv (from https://gluebenchmark.com/tasks), or JSON lines as "
            f"DIR/{info.name}/train.jsonl and dev.jsonl, and pass --data-dir DIR; see docs/llm.md.")


def _load_hf(task: str, split: str) -> list[GlueExample]:
    info = GLUE_TASKS[task]
    offline = (f"Offline, pass --data-dir DIR holding GLUE's TSV files (DIR/{info.folder}/train.tsv, "
               f"DIR/{info.folder}/dev.tsv) or JSON lines; see docs/llm.md.")
    try:
        import datasets
    except ImportError:
        raise DataNotFoundError(f"reading GLUE {info.folder} without --data-dir needs the 'datasets' package "
                                f"(pip install 'grft-vision[llm]'). {offline}") from None
    hf_split = "validation" if split == "dev" else split
    try:
        rows = datasets.load_dataset(_HF_DATASET, task, split=hf_split)
    except Exception as error:  # network, cache and hub errors come in many types
        raise DataNotFoundError(f"could not load GLUE {info.folder} ({hf_split}) through Hugging Face datasets "
                                f"({type(error).__name__}: {error}). {offline}") from error
    return [GlueExample(tuple(str(row[name]) for name in info.text_fields),
                        _label_id(row["label"], info, f"{_HF_DATASET}/{task} {hf_split} row {i}"))
            for i, row in enumerate(rows)]


def load_glue(task: str, split: str, data_dir: str | Path | None = None, layout: str = "auto") -> GlueDataset:
    """One split (``train``, ``dev``) of a GLUE task as a :class:`GlueDataset` (see the module docstring).

    Raises:
        ValueError: unknown task, layout or split (e.g. the unlabelled ``test``), or a malformed file.
        DataNotFoundError: the files are not there, or Hugging Face ``datasets`` is missing or offline.
    """
    if task not in GLUE_TASKS:
        raise ValueError(f"Unknown GLUE task {task!r}; valid names: {', '.join(GLUE_TASK_NAMES)}.")
    if layout not in GLUE_LAYOUTS:
        raise ValueError(f"layout={layout!r} is not a GLUE layout; use one of {', '.join(GLUE_LAYOUTS)}.")
    if split == "test":
        raise ValueError("GLUE's test sets are unlabelled; evaluate on 'dev' (eval_split=dev), as the paper does.")
    if layout == "hf" or (layout == "auto" and data_dir is None):
        examples, source = _load_hf(task, split), f"{_HF_DATASET}/{task}"
    else:
        if data_dir is None:
            raise ValueError(f"layout={layout!r} needs --data-dir (the folder holding GLUE's files).")
        root = Path(data_dir).expanduser()
        extensions = ("tsv", "jsonl") if layout == "auto" else (layout,)
        looked = _candidates(root, GLUE_TASKS[task], split, extensions)
        path = next((candidate for candidate in looked if candidate.is_file()), None)
        if path is None:
            raise DataNotFoundError(_missing_message(task, split, root, looked))
        reader = read_glue_tsv if path.suffix == ".tsv" else read_glue_jsonl
        examples, source = reader(path, task), str(path)
    if not examples:
        raise ValueError(f"{source}: the {split} split of {task} holds no example.")
    return GlueDataset(task, split, examples, source)


def tokenize_dataset(dataset: GlueDataset, tokenizer: Any, max_length: int, truncation: bool = True) -> int:
    """Tokenise every example (special tokens added, no padding); returns how many were truncated.

    Args:
        dataset: the examples; their token ids are stored in ``dataset.encodings``.
        tokenizer: a Hugging Face tokenizer.
        max_length: the longest sequence kept, special tokens included.
        truncation: cut longer examples to ``max_length`` (longest text first); False raises instead.

    Raises:
        SequenceTooLongError: an example is longer than ``max_length`` and ``truncation`` is False.
    """
    columns = list(zip(*(example.texts for example in dataset.examples)))
    keys = [key for key in ("input_ids", "token_type_ids") if key in getattr(tokenizer, "model_input_names", ())
            or key == "input_ids"]
    encoded = tokenizer(*map(list, columns), add_special_tokens=True, truncation=False)
    long = [i for i, ids in enumerate(encoded["input_ids"]) if len(ids) > max_length]
    if long and not truncation:
        first = long[0]
        raise SequenceTooLongError(
            f"{dataset.source}: example {first} is {len(encoded['input_ids'][first])} tokens long, more than "
            f"max_length={max_length} ({len(long)} of {len(dataset)} examples are); raise --max-length (up to the "
            "model's limit) or allow truncation (--set truncation=true).")
    if long:
        cut = tokenizer(*([column[i] for i in long] for column in columns), add_special_tokens=True,
                        truncation="longest_first", max_length=max_length)
        for position, i in enumerate(long):
            for key in encoded:
                if key in cut:
                    encoded[key][i] = cut[key][position]
        _logger.warning("%s: %d of %d examples are longer than max_length=%d tokens and were truncated.",
                        dataset.source or dataset.task.name, len(long), len(dataset), max_length)
    dataset.encodings = [{key: list(encoded[key][i]) for key in keys if key in encoded} for i in range(len(dataset))]
    return len(long)


class PadCollate:
    """Pads a list of dataset items into a batch of tensors (picklable, for DataLoader workers).

    Returns ``{"input_ids" [B, L], "attention_mask" [B, L], ("token_type_ids" [B, L],) "labels" [B],
    "index" [B]}`` with ``L`` the longest sequence of the batch, padded on ``side`` with ``pad_id``.
    """

    def __init__(self, pad_id: int, side: str = "right") -> None:
        if side not in ("left", "right"):
            raise ValueError(f"padding side {side!r} must be 'left' or 'right'.")
        self.pad_id, self.side = int(pad_id), side

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        length = max(len(item["input_ids"]) for item in items)
        batch: dict[str, torch.Tensor] = {}
        for key, fill in (("input_ids", self.pad_id), ("token_type_ids", 0)):
            if key in items[0]:
                batch[key] = torch.tensor([self._pad(item[key], length, fill) for item in items], dtype=torch.long)
        batch["attention_mask"] = torch.tensor([self._pad([1] * len(item["input_ids"]), length, 0) for item in items],
                                               dtype=torch.long)
        batch["labels"] = torch.tensor([item["label"] for item in items], dtype=torch.long)
        if "index" in items[0]:  # transformers' Trainer drops the keys its model does not take
            batch["index"] = torch.tensor([item["index"] for item in items], dtype=torch.long)
        return batch

    def _pad(self, values: Sequence[int], length: int, fill: int) -> list[int]:
        padding = [fill] * (length - len(values))
        return [*values, *padding] if self.side == "right" else [*padding, *values]
