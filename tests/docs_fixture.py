"""The docs fixture: what the documentation's snippets and commands name but a test cannot download.

Documented in docs/usage.md ("About the snippets"). Nothing else is changed:

- ``timm.create_model(name, pretrained=True, ...)`` gives a tiny random model of the same family, always the
  same for one name (a ViT of depth 2 and width 32 at 32 px; a ResNet with one block per stage);
- a Hugging Face model id that is not a local folder (``meta-llama/Llama-3.2-1B``) is a tiny random Llama with
  a word-level tokenizer, saved once in the fixture's folder;
- VTAB's TFDS data is TFDS's own mock data (``tfds.testing.mock_data``), small;
- FGVC data roots named in a command are generated folders of VPT's json layout;
- ``glue_data/`` (relative to the working directory) holds a few lines of GLUE's TSV files.

:func:`install` applies it to this process (the tests use it through pytest's ``monkeypatch``);
``tests/docs_fixture_site/sitecustomize.py`` applies it to a process the tests start (``torchrun``).
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import timm
import torch
from PIL import Image

TINY_VIT = {"depth": 2, "embed_dim": 32, "num_heads": 2, "img_size": 32}
TINY_RESNET = {"layers": [1, 1, 1, 1]}
MOCK_EXAMPLES = 12


def tiny_timm_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """The options that make ``name`` tiny (the caller's own options win)."""
    base = name.split(".")[0]
    family = TINY_VIT if base.startswith(("vit_", "deit_")) else TINY_RESNET if base.startswith("resnet") else {}
    return {**family, **options}


def _tiny_create_model(original: Callable[..., torch.nn.Module]) -> Callable[..., torch.nn.Module]:
    @functools.wraps(original)
    def create_model(name: str, pretrained: bool = False, **options: Any) -> torch.nn.Module:
        if not pretrained or options.get("pretrained_cfg_overlay"):  # random, or a local file: as asked
            return original(name, pretrained=pretrained, **options)
        with torch.random.fork_rng(devices=[]):  # the same "pre-trained" weights on every call
            torch.manual_seed(0)
            return original(name, pretrained=False, **tiny_timm_options(name, options))

    return create_model


def tiny_llama(folder: Path) -> Path:
    """A tiny random Llama classifier with its tokenizer in ``folder`` (saved once)."""
    if not (folder / "config.json").is_file():
        from tiny_llm import save_tiny

        save_tiny(folder, "llama", positions=512)
    return folder


def _hub_to_folder(original: Callable, folder: Path) -> Callable:
    def from_pretrained(name: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(name, str) and not Path(name).expanduser().exists() and "/" in name:
            name = str(tiny_llama(folder))
        return original(name, *args, **kwargs)

    return from_pretrained


def write_glue_data(root: Path) -> None:
    """``root/glue_data/<task>/{train,dev}.tsv`` for CoLA, MRPC and RTE."""
    from tiny_llm import write_glue

    for task in ("cola", "mrpc", "rte"):
        write_glue(root / "glue_data", task, {"train": 24, "dev": 8})


def write_image_folder(root: Path, classes: int = 3, per_class: int = 4) -> Path:
    """An ImageFolder layout ``root/train/<class>/<i>.png`` of small random images."""
    rng = np.random.default_rng(0)
    for label in range(classes):
        folder = root / "train" / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    return root


def write_fgvc_json(root: Path, classes: int = 4, per_class: int = 3) -> Path:
    """A CUB-like dataset root of VPT's json layout: ``images/`` and ``{train,val,test}.json`` (a path under
    ``images/`` -> class id)."""
    rng = np.random.default_rng(1)
    (root / "images").mkdir(parents=True, exist_ok=True)
    splits: dict[str, dict[str, int]] = {"train": {}, "val": {}, "test": {}}
    for label in range(classes):
        for index in range(per_class):
            name = f"{label}_{index}.jpg"
            Image.fromarray(rng.integers(0, 255, (36, 44, 3), dtype=np.uint8)).save(root / "images" / name)
            for split in splits:
                splits[split][name] = label + 1
    for split, entries in splits.items():
        (root / f"{split}.json").write_text(json.dumps(entries))
    return root


def install(patch: Callable[[Any, str, Any], None], folder: Path, fgvc_roots: dict[str, str] | None = None) -> None:
    """Apply the fixture with ``patch(owner, attribute, value)`` (``monkeypatch.setattr``, or ``setattr``).

    Args:
        folder: where the tiny Hugging Face model is saved.
        fgvc_roots: FGVC data roots named in commands -> generated folders.
    """
    from timm import models as timm_models

    tiny = _tiny_create_model(timm.create_model)
    patch(timm, "create_model", tiny)
    patch(timm_models, "create_model", tiny)
    import transformers

    for cls in (transformers.AutoTokenizer, transformers.AutoConfig, transformers.AutoModelForSequenceClassification):
        patch(cls, "from_pretrained", _hub_to_folder(cls.from_pretrained, folder / "llama"))
    if fgvc_roots:
        from grft_vision.data import factory

        original = factory.create_dataset

        def create_dataset(name: str, split: str, **options: Any) -> Any:
            data_dir = options.get("data_dir")
            if data_dir is not None:
                options["data_dir"] = fgvc_roots.get(os.path.expanduser(str(data_dir)), data_dir)
            return original(name, split, **options)

        patch(factory, "create_dataset", create_dataset)
        import grft_vision.data

        patch(grft_vision.data, "create_dataset", create_dataset)
        import grft_vision.training.task as task

        patch(task, "create_dataset", create_dataset)
