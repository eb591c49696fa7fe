"""What earlier versions wrote still loads and gives the same outputs: a run directory interrupted before the
core redesign resumes, and a timm checkpoint of a wrapped model (owned tensors under the old
``parametrizations`` keys) exports and resumes. The fixtures in ``tests/fixtures/v1/`` were written by commit
67a0f16 (``tests/fixtures/v1/make_v1.py`` says how). Adapter files of formats 1 and 2: ``test_adapter_files.py``.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from grft_vision import GRFTConfig, apply_grft
from grft_vision.commands import train_vtab
from grft_vision.integrations.timm import resume_checkpoint
from grft_vision.io.export import export_merged

V1 = Path(__file__).resolve().parent / "fixtures" / "v1"
ARGS = ["--dataset", "synthetic", "--rows", "1", "--epochs", "3", "--quiet", "--workers", "0",
        "--set", "warmup_epochs=0", "--set", "synthetic_samples=48", "--set", "batch_size=16", "--set", "eval_every=1"]


@pytest.mark.usefixtures("one_thread")
def test_a_run_directory_of_the_previous_version_resumes_as_an_uninterrupted_run(tmp_path):
    old = tmp_path / "old"
    shutil.copytree(V1 / "run_v1", old)
    assert train_vtab([*ARGS, "--run-dir", str(old), "--resume"]) == 0
    assert train_vtab([*ARGS, "--run-dir", str(tmp_path / "new")]) == 0
    resumed, fresh = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("old", "new"))
    assert resumed["history"] == fresh["history"] and len(resumed["history"]) == 3
    adapters = [load_file(tmp_path / name / "adapter.safetensors") for name in ("old", "new")]
    assert adapters[0].keys() == adapters[1].keys()
    for key in adapters[0]:
        assert torch.equal(adapters[0][key], adapters[1][key]), key
    assert (old / ".grft-run").stat().st_size  # the old run is marked as a run of grft-vision now


def _tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32, depth=2,
                             embed_dim=32, num_heads=2).eval()


def test_a_wrapped_timm_checkpoint_of_the_previous_version_exports_and_resumes():
    expected = torch.load(V1 / "wrapped_v1_expected.pt", weights_only=True)
    plain = export_merged(V1 / "wrapped_v1.pth.tar")
    assert not any("grft" in key or "parametrizations" in key for key in plain.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(plain(expected["input"]), expected["logits"], atol=1e-5, rtol=1e-5)
    # timm's resume of the same checkpoint into a model wrapped as for training (the old keys load too)
    model = _tiny()
    generator = torch.Generator().manual_seed(0)
    scores = {f"{n}.weight": torch.rand(m.weight.shape, generator=generator) for n, m in model.named_modules()
              if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    apply_grft(model, scores, GRFTConfig(structure="column", k=2, train_layer_scale=False))
    resume_checkpoint(model, V1 / "wrapped_v1.pth.tar")
    with torch.no_grad():
        torch.testing.assert_close(model(expected["input"]), expected["logits"], atol=1e-5, rtol=1e-5)
