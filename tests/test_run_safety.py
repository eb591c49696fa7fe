"""What used to go wrong silently: reused run directories, stale checkpoints, weights of another
architecture, diverging runs, selections that depend on the worker count, NaN scores, lost files."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file, save_file

import grft_vision.selection.gradients
from grft_vision.config import ConfigError, GRFTConfig
from grft_vision.files import atomic_write, remove_temporaries
from grft_vision.selection import SelectionError, choose_indices
from grft_vision.training import cli, create_timm_model
from grft_vision.training.checkpoint import load_checkpoint
from grft_vision.training.config import VisionTrainConfig
from grft_vision import TrainingError
from grft_vision.training.divergence import DivergenceWatch, check_finite_parameters
from grft_vision.training.task import VisionTask

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "vtab"
TINY = ["--dataset", "synthetic", "--model", "test_vit", "--no-pretrained", "--img-size", "32",
        "--epochs", "1", "--warmup-epochs", "1", "--batch-size", "8", "--workers", "0", "--quiet",
        "--set", "synthetic_samples=16"]


def train(*args: str) -> int:
    return cli.main("vtab", list(args), CONFIGS)


def metrics_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


# ------------------------------------------------------------------------------------------ run directories

def test_run_directory_belongs_to_one_run(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert train(*TINY, "--run-dir", str(run_dir), "--rows", "1") == 0
    events = len(list((run_dir / "tb").iterdir()))
    assert train(*TINY, "--run-dir", str(run_dir), "--rows", "2") == 2  # a reused directory is refused
    assert "already holds a run" in capsys.readouterr().err

    # the case: a k=2 run's config.yaml next to the k=1 run's checkpoint (the k=2 run died early)
    settings = yaml.safe_load((run_dir / "config.yaml").read_text())
    (run_dir / "config.yaml").write_text(yaml.safe_dump({**settings, "k": 2}))
    assert train(*TINY, "--run-dir", str(run_dir), "--rows", "2", "--resume") == 2
    assert "checkpoint.pt belongs to an earlier run" in capsys.readouterr().err
    assert load_file(run_dir / "adapter.safetensors")["blocks.0.attn.qkv.grft_indices"].numel() == 1

    assert train(*TINY, "--run-dir", str(run_dir), "--rows", "2", "--overwrite") == 0
    assert metrics_of(run_dir)["k"] == 2 and yaml.safe_load((run_dir / "config.yaml").read_text())["k"] == 2
    assert load_file(run_dir / "adapter.safetensors")["blocks.0.attn.qkv.grft_indices"].numel() == 2
    assert len(list((run_dir / "tb").iterdir())) == events  # the old run's curves went with it


# ------------------------------------------------------------------------------------------ --checkpoint

def test_checkpoint_of_the_model_at_another_size_and_class_count_loads(tmp_path):
    """Only the head differs (1000 classes in the file), and timm resamples the position embedding."""
    source = timm.create_model("test_vit", pretrained=False)
    save_file(source.state_dict(), tmp_path / "w.safetensors")
    config = VisionTrainConfig(model="test_vit", img_size=32, checkpoint=str(tmp_path / "w.safetensors"))
    loaded = create_timm_model(config, 10)
    assert torch.equal(loaded.blocks[3].mlp.fc1.weight, source.blocks[3].mlp.fc1.weight)
    assert loaded.pos_embed.shape[1] == 1 + 2 * 2 and loaded.head.out_features == 10


def test_checkpoint_of_another_architecture_is_refused(tmp_path, capsys):
    save_file(timm.create_model("resnet18", pretrained=False).state_dict(), tmp_path / "resnet.safetensors")
    assert train(*TINY, "--checkpoint", str(tmp_path / "resnet.safetensors"), "--run-dir", str(tmp_path / "r")) == 2
    error = capsys.readouterr().err
    assert "does not fit 'test_vit'" in error and "ResNet-style" in error and "blocks.0." in error


# ------------------------------------------------------------------------------------------ divergence

def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = [*TINY, "--warmup-epochs", "0", "--epochs", "3", "--lr", "1e6", "--run-dir", str(run_dir),
            "--set", "divergence_window=3"]
    assert train(*args) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: the run diverged at epoch 2") and "--lr" in error and len(error.splitlines()) == 1
    checkpoint = load_checkpoint(run_dir / "checkpoint.pt")
    assert checkpoint["epoch"] == 0 and checkpoint["divergence"]["streak"] == 1  # epoch 1, before the 3rd step
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "adapter.safetensors").exists()
    assert train(*args, "--resume", "--set", "divergence_factor=0") == 0  # the switch: train on regardless
    assert metrics_of(run_dir)["history"][-1]["loss"] > 1e3


def test_divergence_rule():
    watch = DivergenceWatch(factor=10, window=3)
    for loss in (2.0, 25.0, 30.0, 3.0, 21.0, 40.0):  # a streak broken by one normal step
        watch.update(loss, epoch=0, step=1)
    with pytest.raises(TrainingError, match=r"stayed above 20 \(10 x max\(first loss 2, 1\)\) for 3 steps"):
        watch.update(50.0, epoch=0, step=7)
    near_zero = DivergenceWatch(factor=10, window=2)
    for loss in (0.01, 0.5, 0.9, 2.0):  # far above 10 x 0.01, but below the floor of 10 x 1
        near_zero.update(loss, epoch=0, step=1)
    off = DivergenceWatch(factor=0, window=1)
    off.update(1.0, epoch=0, step=1)
    off.update(1e30, epoch=0, step=2)


def test_non_finite_parameter_is_named():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    check_finite_parameters(model, epoch=0)
    with torch.no_grad():
        model[1].bias[0] = float("inf")
    with pytest.raises(TrainingError, match=r"epoch 3: parameter '1\.bias' holds NaN or inf"):
        check_finite_parameters(model, epoch=2)


# ------------------------------------------------------------------------------------------ selection

def test_selection_does_not_depend_on_the_worker_count(tmp_path):
    selections = []
    for workers in ("0", "2"):
        run_dir = tmp_path / f"workers{workers}"
        assert train(*TINY, "--workers", workers, "--set", "num_subsets=2", "--warmup-epochs", "0",
                     "--run-dir", str(run_dir)) == 0
        selection = json.loads((run_dir / "selection.json").read_text())
        selection.pop("seconds")
        selections.append(selection)
    assert selections[0] == selections[1]  # the subset losses too: the same augmented views


def test_nan_or_inf_scores_are_refused():
    score = torch.rand(4, 3)
    assert choose_indices(score, "row", 1).tolist() == [int(score.sum(1).argmax())]
    for bad in (float("nan"), float("inf")):
        score[2, 1] = bad
        with pytest.raises(SelectionError, match=r"layer 'blocks.0.fc': 1 of its 12 scores are NaN or inf"):
            choose_indices(score, "row", 1, layer_name="blocks.0.fc")


def test_large_k_is_refused_before_the_selection_pass(tmp_path, capsys, monkeypatch):
    def no_selection(*args, **kwargs):
        raise AssertionError("the selection pass ran")

    monkeypatch.setattr(grft_vision.selection.gradients, "compute_scores", no_selection)
    assert train(*TINY, "--rows", "500", "--run-dir", str(tmp_path / "r")) == 2
    assert "k=500 is larger than layer 'patch_embed.proj'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ settings

@pytest.mark.parametrize("cls, values, message", [
    (GRFTConfig, {"entropy_bins": 1}, r"entropy_bins=1 must be >= 2"),
    (GRFTConfig, {"budget_params": 0}, r"budget_params=0 must be >= 1"),
    (GRFTConfig, {"d3_eps": 0.0}, r"d3_eps=0\.0 must be > 0"),
    (GRFTConfig, {"reg_lambda": float("inf")}, r"reg_lambda=inf must be a finite number"),
    (GRFTConfig, {"clamp_k": 1}, r"clamp_k=1 must be true or false"),
    (GRFTConfig, {"selection_batch_size": 0}, r"selection_batch_size=0 must be >= 1"),
    (VisionTrainConfig, {"std": [0.5, 0.0, 0.5]}, r"std=.* each > 0"),
    (VisionTrainConfig, {"smoothing": 1.0}, r"smoothing=1\.0 must be in \[0, 1\)"),
    (VisionTrainConfig, {"synthetic_image_size": 2}, r"synthetic_image_size=2 must be >= 4"),
    (VisionTrainConfig, {"interpolation": "cubic"}, r"interpolation='cubic' is not known"),
    (VisionTrainConfig, {"amp": "no"}, r"amp='no' must be true or false"),
])
def test_settings_are_validated_when_built(cls, values, message):
    with pytest.raises(ConfigError, match=message):
        cls(**values)


# ------------------------------------------------------------------------------------------ genuine bugs

def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    """Any other exception, a ValueError included, is not reported as a user error."""
    def broken(*args, **kwargs):
        raise ValueError("a bug, not a user error")

    monkeypatch.setattr(VisionTask, "datasets", broken)
    with pytest.raises(ValueError, match="a bug"):
        train(*TINY, "--run-dir", str(tmp_path / "r"))


# ------------------------------------------------------------------------------------------ files

def test_atomic_write_keeps_the_old_file_on_any_error(tmp_path):
    target = tmp_path / "config.yaml"
    target.write_text("old")
    for failure in (OSError(28, "No space left on device"), KeyboardInterrupt()):
        with pytest.raises(type(failure)):
            with atomic_write(target, "w") as handle:
                handle.write("half of the new")
                raise failure
        assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["config.yaml"]
    with atomic_write(target, "w") as handle:
        handle.write("new")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


def test_remove_temporaries_removes_only_those(tmp_path):
    for name in (".checkpoint.pt.a1b2c3d4.tmp", ".metrics.json.zz_9yy8x.tmp", "checkpoint.pt", "notes.tmp"):
        (tmp_path / name).write_text("x")
    removed = remove_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == [".checkpoint.pt.a1b2c3d4.tmp", ".metrics.json.zz_9yy8x.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "notes.tmp"]


_DIE_IN_SECOND_CHECKPOINT = """
import os, signal, sys
import torch
from grft_vision.training.cli import main

saves, real_save = [], torch.save


def save_then_die(payload, handle, *args, **kwargs):
    saves.append(handle)
    if len(saves) == 2:  # the checkpoint after the second epoch: half written, then killed
        handle.write(b"the first bytes of a checkpoint")
        handle.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(payload, handle, *args, **kwargs)


torch.save = save_then_die
sys.exit(main("vtab", sys.argv[2:], sys.argv[1]))
"""


def test_sigkill_during_the_checkpoint_write_then_resume(tmp_path):
    args = [*TINY, "--epochs", "2", "--set", "synthetic_samples=24", "--set", "drop_path=0.1"]
    assert train(*args, "--run-dir", str(tmp_path / "straight")) == 0
    script = tmp_path / "die.py"
    script.write_text(_DIE_IN_SECOND_CHECKPOINT)
    run_dir = tmp_path / "killed"
    # the same thread count as this process, so that the sums of the first epoch match the straight run's
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()),
           "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    done = subprocess.run([sys.executable, str(script), str(CONFIGS), *args, "--run-dir", str(run_dir)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    leftovers = [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 1 and leftovers[0].startswith(".checkpoint.pt.")  # the write it was killed in
    checkpoint = load_checkpoint(run_dir / "checkpoint.pt")  # the previous checkpoint, intact
    assert checkpoint["epoch"] == 0 and checkpoint["seconds"]["selection"] > 0

    assert train(*args, "--run-dir", str(run_dir), "--resume") == 0
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]
    straight, resumed = metrics_of(tmp_path / "straight"), metrics_of(run_dir)
    assert straight["history"] == resumed["history"]
    assert resumed["selection_seconds"] == checkpoint["seconds"]["selection"]  # the original selection's time
    one, two = load_file(tmp_path / "straight" / "adapter.safetensors"), load_file(run_dir / "adapter.safetensors")
    assert one.keys() == two.keys() and all(torch.equal(one[key], two[key]) for key in one)
