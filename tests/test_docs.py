"""Docs are code: every Python block of README.md and docs/*.md runs as written, and the README's training
commands run (slow); the README's two set-up commands run in .ci/run. Real checkpoints and datasets are
replaced by the docs fixture (tests/docs_fixture.py, described in docs/usage.md "About the snippets")."""
from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import docs_fixture
from grft_vision.selection.scores import SCORES
from grft_vision.tuner.structures import STRUCTURES

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)


def blocks(path: Path, language: str) -> list[str]:
    """The code blocks of one language in a Markdown file, in order."""
    return [code for lang, code in BLOCK.findall(path.read_text(encoding="utf-8")) if lang == language]


def test_the_block_reader_reads_blocks():
    text = "a\n```python\nx = 1\n```\nb\n```bash\nls\n```\n"
    assert BLOCK.findall(text) == [("python", "x = 1\n"), ("bash", "ls\n")]


def _readme_names() -> dict:
    """What the README's snippet leaves to the reader: a timm model and an ordinary DataLoader."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32, depth=2)
    data = TensorDataset(torch.randn(32, 3, 32, 32), torch.arange(32) % 5)
    return {"model": model, "train_loader": DataLoader(data, batch_size=8, shuffle=True)}


def _usage_names(folder: Path) -> dict:
    """What timm's train.py has defined where the usage.md block goes in (its model is the file's own)."""
    images = docs_fixture.write_image_folder(folder / "images")
    return {"args": argparse.Namespace(dataset="", data_dir=str(images), train_split="train", input_size=None,
                                       crop_pct=None, mean=None, std=None, interpolation="")}


@pytest.fixture
def registries():
    """Blocks may register a structure or a score: the registries are restored afterwards."""
    saved = dict(STRUCTURES._entries), dict(SCORES._entries)
    yield
    STRUCTURES._entries.clear()
    STRUCTURES._entries.update(saved[0])
    SCORES._entries.clear()
    SCORES._entries.update(saved[1])


@pytest.mark.parametrize("path", [p for p in DOCS if blocks(p, "python")], ids=lambda p: p.name)
def test_the_python_blocks_run_as_written(path, tmp_path, monkeypatch, registries, one_thread):
    monkeypatch.chdir(tmp_path)
    docs_fixture.install(monkeypatch.setattr, tmp_path / "hub")
    docs_fixture.write_glue_data(tmp_path)
    namespace: dict = {"__name__": f"docs_{path.stem}"}
    namespace.update({"README.md": _readme_names, "usage.md": lambda: _usage_names(tmp_path)}.get(path.name, dict)())
    for index, code in enumerate(blocks(path, "python")):
        try:
            exec(compile(code, f"{path.name} block {index + 1}", "exec"), namespace)
        except Exception as error:
            raise AssertionError(f"{path.name}, Python block {index + 1} fails: {error!r}") from error


def _readme_training_commands() -> list[str]:
    """The README's training commands (the shell block after the set-up blocks), comments removed."""
    commands = []
    for code in blocks(ROOT / "README.md", "bash"):
        for line in code.splitlines():
            line = line.split("#", 1)[0].strip()
            if line and "venv" not in line:
                commands.append(line)
    return commands


def test_the_readme_names_its_training_commands():
    commands = _readme_training_commands()
    assert any("train_vtab.py" in c for c in commands) and any("train_fgvc.py" in c for c in commands)
    assert any(c.startswith("torchrun") for c in commands) and any("train_glue.py" in c for c in commands)


@pytest.mark.slow
@pytest.mark.parametrize("command", _readme_training_commands())
def test_the_readme_training_commands_run(command, tmp_path):
    """Each command as written, in a fresh directory, with the docs fixture in the processes it starts (TFDS's
    mock data for VTAB, a generated folder for the FGVC root it names, a tiny model for every pre-trained one)."""
    words = shlex.split(command)
    fgvc = {os.path.expanduser(words[i + 1]): str(docs_fixture.write_fgvc_json(tmp_path / "fgvc"))
            for i, word in enumerate(words) if word == "--data-dir" and "fgvc" in command}
    docs_fixture.write_glue_data(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "GRFT_DOCS_FIXTURE": json.dumps({"folder": str(tmp_path / "hub"), "fgvc_roots": fgvc}),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "docs_fixture_site"), str(ROOT / "tests"), str(ROOT),
                                          os.environ.get("PYTHONPATH", "")])}
    launcher = [sys.executable, "-m", "torch.distributed.run"] if words[0] == "torchrun" else [sys.executable]
    script = next(i for i, word in enumerate(words) if word.endswith(".py"))
    argv = [*launcher, *words[1:script], str(ROOT / words[script]), *words[script + 1:], "--quiet"]
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert " | trainable " in done.stdout.strip().splitlines()[-1]


@functools.cache
def _anchors(path: Path) -> frozenset[str]:
    """GitHub's anchors of a Markdown file's headings (lower case, punctuation but ``-`` and ``_`` dropped,
    spaces to ``-``, repeats numbered), code blocks skipped."""
    text = BLOCK.sub("", path.read_text(encoding="utf-8"))
    anchors: set[str] = set()
    for heading in re.findall(r"^#{1,6} (.+)$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchor, count = slug, 0
        while anchor in anchors:
            count += 1
            anchor = f"{slug}-{count}"
        anchors.add(anchor)
    return frozenset(anchors)


def test_the_links_between_the_docs_lead_somewhere():
    """Every relative link of README.md and docs/*.md names a file that exists, and a heading of it."""
    broken = []
    for path in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", BLOCK.sub("", path.read_text(encoding="utf-8"))):
            if re.match(r"[a-z]+:", target):
                continue  # a web address
            file, _, anchor = target.partition("#")
            linked = (path.parent / file).resolve() if file else path
            if not linked.exists():
                broken.append(f"{path.name}: {target} (no file {file})")
            elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
                broken.append(f"{path.name}: {target} (no heading #{anchor})")
    assert not broken, "broken links:\n" + "\n".join(broken)
