"""``python -m grft_vision.export``: every kind of checkpoint to plain weights, and every wrong combination refused
with one line (exit code 2). Tiny random timm models; the timm train.py and Trainer cases are in
test_timm_train.py and test_hf_trainer.py."""
from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from grft_vision import GRFTConfig, apply_grft, load_adapter, merge_grft, save_adapter
from grft_vision.export import main as export_main
from grft_vision.io.checkpoints import read_saved
from grft_vision.io.export import export_merged
from grft_vision.training import cli, create_timm_model
from grft_vision.training.config import VisionTrainConfig, builtin_config_dir

from conftest import random_scores

ROOT = Path(__file__).resolve().parents[1]
RESNET = {"layers": [1, 1, 1, 1], "num_classes": 5}


pytestmark = pytest.mark.usefixtures("one_thread")


def trained(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every trainable tensor of the active adapter a random value (as training would)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


def wrapped_resnet(tmp_path: Path, adapters=("default",)) -> tuple[torch.nn.Module, Path]:
    """A wrapped ResNet (BatchNorm statistics owned, rows on convs) saved as a bare wrapped state dict."""
    torch.manual_seed(0)
    model = timm.create_model("resnet18", **RESNET).eval()
    scores = [random_scores(model, index) for index in range(len(adapters))]
    for index, name in enumerate(adapters):
        apply_grft(model, scores=scores[index], config=GRFTConfig(k=2), adapter_name=name)
        trained(model, index)
    model.train()
    with torch.no_grad():  # BatchNorm statistics move in train mode: into the adapter's own copies
        model(torch.randn(4, 3, 32, 32))
    path = tmp_path / "wrapped.pth"
    torch.save(model.state_dict(), path)
    return model.eval(), path


def plain_outputs(state_path: Path, images: torch.Tensor) -> torch.Tensor:
    plain = timm.create_model("resnet18", checkpoint_path=str(state_path), **RESNET).eval()
    with torch.no_grad():
        return plain(images)


def test_wrapped_state_dict_with_batchnorm_statistics(tmp_path):
    model, path = wrapped_resnet(tmp_path)
    out = tmp_path / "merged.pth"
    assert export_main([str(path), "--out", str(out), "--model", "resnet18", "--model-kwargs", "layers=[1,1,1,1]",
                        "num_classes=5"]) == 0
    expected = merge_grft(copy.deepcopy(model)).state_dict()
    merged = torch.load(out, weights_only=True)
    assert merged.keys() == expected.keys() and all(torch.equal(merged[k], expected[k]) for k in expected)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(plain_outputs(out, images), model(images))


def test_run_checkpoint_and_adapter_file_give_the_same_plain_weights(tmp_path):
    """grft-vision's checkpoint.pt knows its model and base file; the adapter file needs --base (and finds its
    architecture and image size in its metadata)."""
    weights = tmp_path / "w.safetensors"
    torch.manual_seed(0)
    save_file(timm.create_model("test_vit").state_dict(), weights)  # 1000 classes, 160 px: timm adapts both
    run_dir = tmp_path / "run"
    assert cli.main("vtab", ["--dataset", "synthetic", "--model", "test_vit", "--checkpoint", str(weights),
                             "--img-size", "32", "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "8",
                             "--workers", "0", "--quiet", "--set", "synthetic_samples=16", "--run-dir", str(run_dir)],
                    builtin_config_dir("vtab")) == 0
    assert export_main([str(run_dir / "checkpoint.pt"), "--out", str(tmp_path / "a.pth")]) == 0
    assert export_main([str(run_dir / "adapter.safetensors"), "--base", str(weights), "--out",
                        str(tmp_path / "b.safetensors")]) == 0
    first = torch.load(tmp_path / "a.pth", weights_only=True)
    second = timm.models.load_state_dict(str(tmp_path / "b.safetensors"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)

    base = create_timm_model(VisionTrainConfig(model="test_vit", img_size=32, checkpoint=str(weights)), 10)
    reference = load_adapter(base, run_dir / "adapter.safetensors").eval()
    plain = timm.create_model("test_vit", num_classes=10, img_size=32, checkpoint_path=str(tmp_path / "a.pth")).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(plain(images), reference(images), atol=1e-5, rtol=1e-5)


def test_adapter_on_other_base_weights_is_refused(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("resnet18", **RESNET)
    torch.save(model.state_dict(), tmp_path / "base.pth")
    apply_grft(model, scores=random_scores(model), config=GRFTConfig(k=1))
    save_adapter(trained(model), tmp_path / "adapter.safetensors")
    other = timm.create_model("resnet18", **RESNET)
    torch.save(other.state_dict(), tmp_path / "other.pth")
    with pytest.raises(Exception, match="trained on different base weights"):
        export_merged(tmp_path / "adapter.safetensors", model="resnet18", model_kwargs=RESNET,
                      base=str(tmp_path / "other.pth"))
    merged = export_merged(tmp_path / "adapter.safetensors", model="resnet18", model_kwargs=RESNET,
                           base=str(tmp_path / "base.pth"))
    assert set(merged.state_dict()) == set(timm.create_model("resnet18", **RESNET).state_dict())


def _ambiguous(tmp_path: Path) -> Path:
    """Every row of a square weight chosen: a row and a column update have the same shapes."""
    model = timm.create_model("test_vit", img_size=32)
    apply_grft(model, scores=random_scores(model), config=GRFTConfig(k=64, target_modules=["*attn.proj"]))
    torch.save(model.state_dict(), tmp_path / "square.pth")
    return tmp_path / "square.pth"


def _plain(tmp_path: Path) -> Path:
    torch.save(timm.create_model("test_vit", img_size=32).state_dict(), tmp_path / "plain.pth")
    return tmp_path / "plain.pth"


def _adapter(tmp_path: Path) -> Path:
    model = timm.create_model("test_vit", img_size=32)
    apply_grft(model, scores=random_scores(model), config=GRFTConfig(k=1))
    save_adapter(model, tmp_path / "adapter.safetensors")
    return tmp_path / "adapter.safetensors"


def _two_adapters(tmp_path: Path) -> Path:
    return wrapped_resnet(tmp_path, adapters=("a", "b"))[1]


def _timm_checkpoint_without_ema(tmp_path: Path) -> Path:
    model, path = wrapped_resnet(tmp_path)
    torch.save({"epoch": 0, "state_dict": model.state_dict(), "arch": "resnet18"}, tmp_path / "last.pth.tar")
    return tmp_path / "last.pth.tar"


TEST_VIT = ["--model", "test_vit", "--model-kwargs", "img_size=32"]
RESNET_FLAGS = ["--model", "resnet18", "--model-kwargs", "layers=[1,1,1,1]", "num_classes=5"]


@pytest.mark.parametrize("make, flags, message", [
    (lambda tmp: tmp / "missing.pth", [], "does not exist"),
    (_plain, TEST_VIT, "plain state dict"),
    (lambda tmp: wrapped_resnet(tmp)[1], [], "pass --model"),
    (lambda tmp: wrapped_resnet(tmp)[1], TEST_VIT, "does not have"),
    (lambda tmp: wrapped_resnet(tmp)[1], [*RESNET_FLAGS, "--base", "x.pth"], "leave them out"),
    (lambda tmp: wrapped_resnet(tmp)[1], ["--model", "resnet_18"], "Did you mean"),
    (_ambiguous, TEST_VIT, "fits the structures ['row', 'column']"),
    (_two_adapters, RESNET_FLAGS, "choose one with --adapter-name"),
    (_two_adapters, [*RESNET_FLAGS, "--adapter-name", "c"], "holds the adapters ['a', 'b']"),
    (_adapter, [], "--base FILE, or --pretrained"),
    (_adapter, ["--base", "missing.pth"], "does not exist"),
    (_timm_checkpoint_without_ema, ["--ema"], "no 'state_dict_ema'"),
])
def test_wrong_combinations_are_one_line_errors(tmp_path, capsys, make, flags, message):
    code = export_main([str(make(tmp_path)), "--out", str(tmp_path / "out.pth"), *flags])
    error = capsys.readouterr().err
    assert code == 2 and message in error and error.startswith("error: ") and error.count("\n") == 1, error
    assert not (tmp_path / "out.pth").exists()


def test_timm_checkpoint_records_its_model_and_an_unknown_suffix_is_refused(tmp_path, capsys):
    path = _timm_checkpoint_without_ema(tmp_path)
    saved = read_saved(path)
    assert saved.model_name == "resnet18" and saved.wrapped is not None
    assert export_main([str(path), "--out", str(tmp_path / "merged.npz"), "--model-kwargs", "layers=[1,1,1,1]",
                        "num_classes=5"]) == 2
    assert "name a .pth" in capsys.readouterr().err


def test_python_m_entry_point(tmp_path):
    done = subprocess.run([sys.executable, "-m", "grft_vision.export", str(tmp_path / "none.pth"), "--out",
                           str(tmp_path / "o.pth")], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2 and done.stderr.startswith("error: ") and "does not exist" in done.stderr


def test_base_weights_of_another_architecture_are_one_line(tmp_path, capsys):
    adapter = _adapter(tmp_path)
    torch.save(timm.create_model("resnet18", **RESNET).state_dict(), tmp_path / "resnet.pth")
    assert export_main([str(adapter), "--base", str(tmp_path / "resnet.pth"), "--out", str(tmp_path / "o.pth")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: --base") and "does not fit" in error and "ResNet-style" in error, error
    assert error.count("\n") == 1, error
