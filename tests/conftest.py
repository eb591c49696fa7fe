"""Shared fixtures: tiny models of every architecture family the core must support; the torchrun and resume checks."""
from __future__ import annotations

import copy
import importlib
import json
import os
import socket
import subprocess
import sys
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import pytest
import timm
import torch
import yaml
from timm.layers import GroupNormAct, StdConv2d
from timm.models.mlp_mixer import MlpMixer
from timm.models.resnetv2 import ResNetV2
from torch import nn

IMG = 32
NUM_CLASSES = 5


def _sequential() -> nn.Module:
    """Plain torch: dense, depthwise and grouped (reflect-padded) convolutions, then an MLP."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, groups=2, padding_mode="reflect", stride=2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, NUM_CLASSES),
    )


# name -> factory; every behavioural test of the core runs over all of them (add a row to extend).
TINY_MODELS = {
    "vit": lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=NUM_CLASSES,
                                     img_size=IMG, depth=2),
    "deit": lambda: timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False,
                                      num_classes=NUM_CLASSES, img_size=IMG, depth=2),
    "swin": lambda: timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=NUM_CLASSES,
                                      img_size=IMG, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 2)),
    # BEiT's attention reads qkv.weight directly (F.linear(x, self.qkv.weight, qkv_bias))
    "beit_direct_weight": lambda: timm.create_model("beit_base_patch16_224", pretrained=False,
                                                    num_classes=NUM_CLASSES, img_size=IMG, depth=2, embed_dim=32,
                                                    num_heads=2),
    "convnext": lambda: timm.create_model("convnext_atto", pretrained=False, num_classes=NUM_CLASSES,
                                          dims=(8, 16, 32, 64), depths=(1, 1, 1, 1)),
    "resnet": lambda: timm.create_model("resnet18", pretrained=False, num_classes=NUM_CLASSES, layers=[1, 1, 1, 1]),
    "mobilenetv3": lambda: timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=NUM_CLASSES),
    "efficientnet_same_pad": lambda: timm.create_model("tf_efficientnet_b0", pretrained=False,
                                                       num_classes=NUM_CLASSES),
    "mixer": lambda: MlpMixer(num_classes=NUM_CLASSES, img_size=IMG, patch_size=8, num_blocks=2, embed_dim=32),
    "bit_stdconv": lambda: ResNetV2(layers=[1, 1], channels=(32, 64), num_classes=NUM_CLASSES, stem_chs=16,
                                    stem_type="fixed", conv_layer=partial(StdConv2d, eps=1e-8),
                                    norm_layer=partial(GroupNormAct, num_groups=8)),
    "sequential": _sequential,
}


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
# on the path as when a script in benchmarks/ runs (its folder comes first): the scripts import their shared
# modules (benchkit, transfer_bench) by name, and so do the worker processes they start
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` (or a package there, or a module of one: ``transfer_bench.jobs``), imported by
    name as the scripts import it."""
    return importlib.import_module(name)


# the tiny script run's settings live in a file, so that --set and flags in a test override them
TINY_RUN_SETTINGS = {"model": "test_vit", "pretrained": False, "img_size": 32, "epochs": 1, "warmup_epochs": 1,
                     "batch_size": 8, "workers": 0, "quiet": True, "synthetic_samples": 16}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> list[str]:
    """The arguments of a tiny synthetic ``train_vtab.py`` run (about two seconds of training)."""
    path = tmp_path_factory.mktemp("settings") / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY_RUN_SETTINGS))
    return ["--dataset", "synthetic", "--config", str(path)]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and are not slowed down by a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_model(name: str, seed: int = 0) -> nn.Module:
    """A freshly initialised tiny model in eval mode, seeded."""
    torch.manual_seed(seed)
    return TINY_MODELS[name]().eval()


def random_scores(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random non-negative score for every linear/conv weight of ``model``."""
    generator = torch.Generator().manual_seed(seed)
    return {f"{name}.weight": torch.rand(module.weight.shape, generator=generator)
            for name, module in model.named_modules() if isinstance(module, (nn.Linear, nn.Conv2d))}


def images(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def two_adapters(family: str = "vit", structure: str = "row") -> tuple[nn.Module, nn.Module]:
    """(original, a copy wrapped with adapters 'a' and 'b' of k = 2 whose deltas and heads are random, 'a'
    active): two adapters that give visibly different outputs."""
    from grft_vision import GRFTConfig, apply_grft, set_adapter

    original = make_model(family)
    model = copy.deepcopy(original)
    for seed, name in ((1, "a"), (2, "b")):
        apply_grft(model, random_scores(original, seed), GRFTConfig(structure=structure, k=2), adapter_name=name)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:  # the adapter just added: its updates and its head
                    param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    set_adapter(model, "a")
    return original, model


@pytest.fixture(params=sorted(TINY_MODELS))
def model_name(request) -> str:
    return request.param


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def histories_of_one_and_two_processes(script_args: list[str], tmp_path: Path) -> tuple[list[dict], list[dict]]:
    """Run a training script once plainly and once under torchrun with 2 CPU processes (gloo); return the
    ``history`` of each run's metrics.json (run directories ``tmp_path/one`` and ``tmp_path/two``)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launchers = {"one": [sys.executable],
                 "two": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                         "--master_port", str(_free_port())]}
    for name, launcher in launchers.items():
        done = subprocess.run([*launcher, *script_args, "--run-dir", str(tmp_path / name)], env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    return tuple(json.loads((tmp_path / name / "metrics.json").read_text())["history"] for name in launchers)


class SimulatedCrash(Exception):
    pass


def raise_at_epoch(monkeypatch, epoch: int, error: type[BaseException]) -> Callable[..., Any]:
    """Make the step loop (``train_one_epoch``) raise ``error`` at the start of ``epoch``; returns the original."""
    from grft_vision.training import trainer

    original = trainer.train_one_epoch

    def raising(step, loader, at_epoch, progress=True):
        if at_epoch == epoch:
            raise error
        return original(step, loader, at_epoch, progress)

    monkeypatch.setattr(trainer, "train_one_epoch", raising)
    return original


def crash_then_resume(main: Callable[..., int], args: list[str], monkeypatch, crash_epoch: int) -> None:
    """``main(*args)`` until a simulated crash at the start of ``crash_epoch``, then ``main(*args, '--resume')``
    to the end (``args`` name the run directory)."""
    from grft_vision.training import trainer

    original = raise_at_epoch(monkeypatch, crash_epoch, SimulatedCrash)
    with pytest.raises(SimulatedCrash):
        main(*args)
    monkeypatch.setattr(trainer, "train_one_epoch", original)
    assert main(*args, "--resume") == 0
