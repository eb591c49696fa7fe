"""First contact: what a new user types works as documented (issue 22's points, one or more tests each).

The docs' own snippets run in test_docs.py; the timm EMA default of export is checked in test_timm_train.py.
"""
from __future__ import annotations

import copy
import io
import json
import multiprocessing
import pickle
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors import safe_open
from torch.utils.data import DataLoader, TensorDataset

from conftest import IMG, NUM_CLASSES, images, make_model, random_scores
from grft_vision import (GRFTConfig, apply_grft, from_pretrained, get_nb_trainable_parameters, list_adapters,
                         merge_and_unload, save_pretrained, set_adapter, unload, unload_grft)
from grft_vision.data import DataNotFoundError
from grft_vision.export import main as export_main
from grft_vision.training import cli

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


def _vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=NUM_CLASSES, img_size=IMG,
                             depth=2).eval()


# 1 ------------------------------------------------------------------ an ordinary DataLoader
def test_apply_grft_takes_an_ordinary_loader_of_image_tensors():
    data = TensorDataset(torch.randn(24, 3, IMG, IMG, generator=torch.Generator().manual_seed(0)),
                         torch.arange(24) % 4)
    chosen = []
    for _ in range(2):
        model = apply_grft(_vit(), config=GRFTConfig(structure="row", k=1),
                           dataloader=DataLoader(data, batch_size=8), progress=False)
        chosen.append([layer.indices for layer in model.grft_state.selection.layers])
    assert chosen[0] == chosen[1]  # the views are drawn from the seeded generator: the same selection


def test_the_selection_of_apply_grft_on_the_scripts_views_equals_the_scripts(tmp_path, tiny):
    from grft_vision.training.config import split_settings
    from grft_vision.training.runner import seed_everything
    from grft_vision.training.task import VisionTask

    run_dir = tmp_path / "run"
    assert cli.main("vtab", [*tiny, "--run-dir", str(run_dir)]) == 0
    script = json.loads((run_dir / "selection.json").read_text())
    settings = yaml.safe_load((run_dir / "config.yaml").read_text())
    train, grft = split_settings(settings)
    seed_everything(train.seed)  # what the script does, through the public pieces
    task = VisionTask()
    train_set, eval_set, classes = task.datasets(train)
    model = task.build_model(train, classes)
    task.prepare_data(train, model, train_set, eval_set)
    apply_grft(model, config=grft, dataloader=task.selection_loader(train, grft, train_set), progress=False)
    assert [layer.indices for layer in model.grft_state.selection.layers] == \
        [layer["indices"] for layer in script["layers"]]


# 3 ------------------------------------------------------------------ one directory, every adapter
def test_a_directory_holds_every_adapter_and_loads_them_all(tmp_path):
    original = make_model("resnet")
    model = copy.deepcopy(original)
    for name, structure in (("default", "row"), ("cols", "column"), ("entries", "sparse")):
        apply_grft(model, random_scores(original, len(name)), GRFTConfig(structure=structure, k=2), adapter_name=name)
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    param.add_(0.05)
    x = images(2)
    expected = {}
    for name in list_adapters(model):
        set_adapter(model, name)
        with torch.no_grad():
            expected[name] = model(x)
    save_pretrained(model, tmp_path / "adapters")
    assert (tmp_path / "adapters" / "adapter_config.json").is_file()
    assert (tmp_path / "adapters" / "cols" / "adapter_config.json").is_file()
    loaded = from_pretrained(copy.deepcopy(original), tmp_path / "adapters")
    assert list_adapters(loaded) == ["default", "cols", "entries"] and loaded.grft_state.active == "default"
    for name, output in expected.items():
        set_adapter(loaded, name)
        with torch.no_grad():
            assert torch.equal(loaded(x), output), name
    one = from_pretrained(copy.deepcopy(original), tmp_path / "adapters", adapter_name="entries")
    assert list_adapters(one) == ["entries"]
    with torch.no_grad():
        assert torch.equal(one(x), expected["entries"])


# 4 ------------------------------------------------------------------ what the base really was
def test_an_adapter_records_where_its_base_weights_came_from(tmp_path):
    model = apply_grft(_vit(), random_scores(_vit()), GRFTConfig(k=1))
    from grft_vision import save_adapter

    path = save_adapter(model, tmp_path / "a.safetensors")
    with safe_open(str(path), "pt") as handle:
        base = json.loads(handle.metadata()["base_model"])
    assert base["pretrained_tag"] is None  # pretrained=False: no tag pretends otherwise
    assert base["weights"] == {"kind": "unknown", "config_tag": "augreg_in21k_ft_in1k"}


def test_the_run_directory_of_a_run_without_pretrained_weights_exports(tmp_path, tiny, capsys):
    run_dir = tmp_path / "run"
    assert cli.main("vtab", [*tiny, "--run-dir", str(run_dir)]) == 0
    with safe_open(str(run_dir / "adapter.safetensors"), "pt") as handle:
        base = json.loads(handle.metadata()["base_model"])
    assert base["weights"] == {"kind": "random", "seed": 42} and base["pretrained_tag"] is None
    for source in ("checkpoint.pt", "adapter.safetensors"):
        out = tmp_path / f"merged-{source}.pth"
        assert export_main([str(run_dir / source), "--out", str(out)]) == 0, capsys.readouterr().err
        plain = timm.create_model("test_vit", num_classes=10, img_size=32, checkpoint_path=str(out)).eval()
        assert plain(images(2)).shape == (2, 10)


# 5 ------------------------------------------------------------------ wrapped models pickle
def _wrapped_with_two_adapters() -> torch.nn.Module:
    original = make_model("resnet")
    model = copy.deepcopy(original)
    for name, structure in (("a", "row"), ("b", "column")):
        apply_grft(model, random_scores(original, 3), GRFTConfig(structure=structure, k=2), adapter_name=name)
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    param.add_(0.1)
    set_adapter(model, "a")
    return model


def _same_model(copy_: torch.nn.Module, model: torch.nn.Module) -> None:
    x = images(2)
    assert list_adapters(copy_) == list_adapters(model) and copy_.grft_state.active == model.grft_state.active
    assert list(copy_.state_dict()) == list(model.state_dict())
    assert all(torch.equal(copy_.state_dict()[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        for name in list_adapters(model):
            set_adapter(model, name)
            set_adapter(copy_, name)
            assert torch.equal(copy_(x), model(x)), name


def test_a_wrapped_model_pickles_and_saves_whole():
    model = _wrapped_with_two_adapters()
    _same_model(pickle.loads(pickle.dumps(model)), model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    _same_model(torch.load(buffer, weights_only=False), model)
    _same_model(copy.deepcopy(model), model)


def _outputs_in_a_worker(model: torch.nn.Module, x: torch.Tensor, threads: int) -> torch.Tensor:
    torch.set_num_threads(threads)  # the parent's: a convolution's sums run in the same order
    with torch.no_grad():
        return model(x)


def test_a_wrapped_model_goes_to_a_spawned_process():
    model = _wrapped_with_two_adapters()
    x = images(2)
    with torch.no_grad():
        expected = model(x)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        assert torch.equal(pool.apply(_outputs_in_a_worker, (model, x, torch.get_num_threads())), expected)


# 6 ------------------------------------------------------------------ the scripts tell the truth
def test_help_shows_real_defaults_and_only_the_scripts_own_datasets(capsys):
    with pytest.raises(SystemExit):
        cli.main("vtab", ["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text
    assert "Peak learning rate. (default: 0.001, or the dataset's config)" in text
    assert "(default: vit_base_patch16_224.augreg_in21k, or the dataset's config)" in text
    assert "dtd" in text and "cub" not in text and "nabirds" not in text


def test_an_unknown_set_key_gets_a_suggestion(capsys, tiny, tmp_path):
    for key, suggestion in (("lerning_rate", "lr"), ("warmup_lrr", "warmup_lr"), ("temprature", "temperature"),
                            ("optimizer", "opt"), ("num_epochs", "epochs")):
        assert cli.main("vtab", [*tiny, "--set", f"{key}=1"]) == 2
        assert f"unknown setting {key!r}. Did you mean {suggestion!r}?" in capsys.readouterr().err


def test_a_run_that_fails_on_its_inputs_writes_nothing(tmp_path, capsys):
    assert cli.main("vtab", ["--dataset", "dtd", "--data-dir", str(tmp_path / "nothing"), "--model", "test_vit",
                             "--no-pretrained", "--run-dir", str(tmp_path / "run")]) == 2
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()


# 7 ------------------------------------------------------------------ missing data: one message, every step
def test_missing_data_is_one_message_with_every_step(tmp_path, monkeypatch):
    from grft_vision.data import VtabTfdsDataset

    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # the vtab extra is not installed
    with pytest.raises(DataNotFoundError) as info:
        VtabTfdsDataset("dtd", "test", data_dir=tmp_path)
    message = str(info.value)
    for step in ("pip install 'grft-vision[vtab]'", "pip install 'grft-vision[tfds-prepare]'", "needs internet",
                 f"python train_vtab.py --dataset dtd --data-dir {tmp_path} --download",
                 "--layout folder --data-dir ROOT, with ROOT/dtd/train800val200.txt"):
        assert step in message, step


def test_download_builds_the_data_through_the_script(tmp_path, monkeypatch, tiny):
    import tensorflow_datasets as tfds

    from grft_vision.data import vtab

    built = []
    monkeypatch.setattr(vtab, "can_build", lambda: True)
    original = tfds.core.DatasetBuilder.download_and_prepare
    with tfds.testing.mock_data(num_examples=16):  # the mock reads; the build is recorded, not run
        monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare",
                            lambda self, **kwargs: built.append((self.name, kwargs.get("file_format"))))
        code = cli.main("vtab", ["--dataset", "dtd", "--data-dir", str(tmp_path), "--download", "--config",
                                 tiny[-1], "--run-dir", str(tmp_path / "run")])
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", original)
    assert code == 0 and ("dtd", "array_record") in built


# 9 ------------------------------------------------------------------ a short run that diverges
def test_a_run_shorter_than_the_divergence_window_that_diverges_fails(tmp_path, capsys, tiny):
    code = cli.main("vtab", [*tiny, "--lr", "1e6", "--epochs", "3", "--set", "warmup_epochs=0", "--set",
                             "synthetic_samples=32", "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 1 and "ended diverged" in err, err


# 10 ------------------------------------------------------------------ PEFT's names
def test_peft_names_work():
    model = _wrapped_with_two_adapters()
    trainable, total = get_nb_trainable_parameters(model)
    assert 0 < trainable < total
    assert merge_and_unload is not None and unload is unload_grft
    plain = merge_and_unload(copy.deepcopy(model))
    assert not hasattr(plain, "grft_state")
    assert not hasattr(unload(model), "grft_state")


# 11 ------------------------------------------------------------------ the last line
def test_the_last_line_gives_accuracy_trainable_share_and_times(tmp_path, capsys, tiny):
    assert cli.main("vtab", [*tiny, "--run-dir", str(tmp_path / "run")]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("test top1 0.") and "trainable" in last and "% of" in last
    assert "selection" in last and "training" in last and str(tmp_path / "run") in last
