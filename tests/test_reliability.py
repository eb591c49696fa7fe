"""Reliability round 3: no lost file and no silent wrong result where features meet — run directories claimed
by two runs, ``--overwrite`` of what is not ours, export onto its own input, loads under an optimizer through
timm's resume, foreign base weights, and errors that used to be tracebacks (see also test_composition.py for
contexts, threads and BatchNorm statistics)."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import images, make_model, random_scores
from grft_vision import AdapterError, ConfigError, GRFTConfig, SelectionError, apply_grft, load_adapter, save_adapter
from grft_vision.export import main as export_main
from grft_vision.integrations.timm import adapter_only, resume_checkpoint
from grft_vision.training import cli
from grft_vision.training.run_dir import RunDirectory

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


def call(args: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = cli.main("vtab", args)
    return code, capsys.readouterr().err


# ------------------------------------------------------------------ run directories
def test_a_run_directory_held_by_a_run_is_refused_to_a_second_one(tmp_path):
    settings = {"seed": 1}
    first = RunDirectory(tmp_path / "run", settings)
    first.check()
    first.claim()
    second = RunDirectory(tmp_path / "run", settings)
    with pytest.raises(ConfigError, match="is being written by another run right now"):
        second.claim()
    first.release()
    with pytest.raises(ConfigError, match="already holds a run"):  # and once the first is done, it holds a run
        RunDirectory(tmp_path / "run", settings).claim()


def test_two_runs_started_together_on_one_run_directory_leave_one_run(tmp_path, tiny):
    """Two real processes on one --run-dir: one finishes (exit 0), the other is refused in one line (exit 2),
    and every file of the directory belongs to the same run (its k is the one config.yaml records)."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    processes = [subprocess.Popen([sys.executable, str(ROOT / "train_vtab.py"), *tiny, "--rows", str(k),
                                   "--run-dir", str(run_dir)], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for k in (1, 2)]
    results = [(process.wait(timeout=300), process.stderr.read()) for process in processes]
    assert sorted(code for code, _ in results) == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    assert len(refused.strip().splitlines()) == 1 and "Traceback" not in refused
    assert "another run" in refused or "already holds a run" in refused
    k = yaml.safe_load((run_dir / "config.yaml").read_text())["k"]
    with safe_open(str(run_dir / "adapter.safetensors"), "pt") as handle:
        assert json.loads(handle.metadata()["config"])["k"] == k
    assert json.loads((run_dir / "metrics.json").read_text())["k"] == k
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert checkpoint["settings"]["k"] == k


def test_overwrite_never_deletes_a_folder_that_holds_no_run_of_ours(tmp_path, capsys, tiny):
    folder = tmp_path / "mine"
    (folder / "tb").mkdir(parents=True)
    (folder / "config.yaml").write_text("my: own settings\n")
    (folder / "metrics.json").write_text("{}")
    (folder / "tb" / "events").write_text("mine")
    before = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    for extra in ([], ["--overwrite"]):
        code, err = call([*tiny, "--run-dir", str(folder), *extra], capsys)
        assert code == 2 and "not a grft-vision run" in err and "--overwrite" not in err, err
    assert {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before


def test_overwrite_replaces_a_run_of_ours(tmp_path, capsys, tiny):
    run_dir = tmp_path / "run"
    assert call([*tiny, "--run-dir", str(run_dir), "--rows", "1"], capsys)[0] == 0
    (run_dir / "notes.txt").write_text("kept")
    assert call([*tiny, "--run-dir", str(run_dir), "--rows", "2", "--overwrite"], capsys)[0] == 0
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["k"] == 2
    assert (run_dir / "notes.txt").read_text() == "kept"  # only what a run writes is replaced


def test_a_batch_not_divisible_by_the_processes_is_refused_before_anything_runs(tmp_path, capsys, tiny, monkeypatch):
    from grft_vision.training import runner
    from grft_vision.training.distributed import DistributedContext

    monkeypatch.setattr(runner.DistributedContext, "from_environment",
                        classmethod(lambda cls, device=None: DistributedContext(0, 3)))
    code, err = call([*tiny, "--run-dir", str(tmp_path / "run")], capsys)
    assert code == 2 and "batch_size=8 must be divisible by the 3 processes" in err
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ export never writes onto its input
@pytest.fixture
def adapter_and_base(tmp_path) -> tuple[Path, Path]:
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, num_classes=5, img_size=32).eval()
    save_file(model.state_dict(), tmp_path / "base.safetensors")
    apply_grft(model, random_scores(model), GRFTConfig(k=1))
    return save_adapter(model, tmp_path / "adapter.safetensors"), tmp_path / "base.safetensors"


@pytest.mark.parametrize("target", ["adapter", "base", "hard link to the base", "into the adapter folder"])
def test_export_refuses_to_write_onto_an_input(target, adapter_and_base, tmp_path, capsys):
    adapter, base = adapter_and_base
    if target == "hard link to the base":
        os.link(base, tmp_path / "linked.safetensors")
    if target == "into the adapter folder":  # a save_pretrained folder as the checkpoint
        from grft_vision import save_pretrained

        torch.manual_seed(0)
        model = load_adapter(timm.create_model("test_vit", pretrained=False, num_classes=5, img_size=32), adapter)
        adapter = save_pretrained(model, tmp_path / "adapter_dir")
    out = {"adapter": adapter, "base": base, "hard link to the base": tmp_path / "linked.safetensors",
           "into the adapter folder": tmp_path / "adapter_dir" / "adapter_model.safetensors"}[target]
    before = {path: path.read_bytes() for path in (adapter, base) if path.is_file()}
    code = export_main([str(adapter), "--base", str(base), "--model", "test_vit", "--model-kwargs", "img_size=32",
                        "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "would write onto the input" in err, err
    assert {path: path.read_bytes() for path in before} == before


def test_export_loads_the_base_strictly_even_without_the_weights_check(adapter_and_base, tmp_path, capsys):
    adapter, _ = adapter_and_base
    foreign = timm.create_model("resnet18", pretrained=False, num_classes=5, layers=[1, 1, 1, 1])
    save_file(foreign.state_dict(), tmp_path / "resnet.safetensors")
    head_only = {"head.weight": torch.zeros(5, 64), "head.bias": torch.zeros(5)}
    save_file(head_only, tmp_path / "head.safetensors")
    for base, pattern in ((tmp_path / "resnet.safetensors", "seems to be for a ResNet-style model"),
                          (tmp_path / "head.safetensors", "of the model's weights are not in the file")):
        code = export_main([str(adapter), "--base", str(base), "--model", "test_vit", "--model-kwargs",
                            "img_size=32", "--no-check-weights", "--out", str(tmp_path / "merged.pth")])
        err = capsys.readouterr().err
        assert code == 2 and pattern in err and "Traceback" not in err, err
        assert not (tmp_path / "merged.pth").exists()


# ------------------------------------------------------------------ loads under an optimizer: timm's resume
def test_timm_resume_into_a_model_with_another_fresh_selection_keeps_the_optimizer_valid(tmp_path):
    from timm.utils import CheckpointSaver

    original = make_model("vit")
    trained = copy.deepcopy(original)
    apply_grft(trained, random_scores(original, 1), GRFTConfig(k=2))
    optimizer = torch.optim.Adam([p for p in trained.parameters() if p.requires_grad], lr=1e-2)
    trained.train()
    trained(images(2)).sum().backward()
    optimizer.step()
    saver = CheckpointSaver(trained, optimizer, checkpoint_dir=str(tmp_path), unwrap_fn=adapter_only)
    saver.save_checkpoint(epoch=0, metric=0.0)
    # a second process: create_model -> apply_grft (a fresh selection, other rows) -> optimizer -> resume
    resumed = copy.deepcopy(original)
    apply_grft(resumed, random_scores(original, 2), GRFTConfig(k=2))
    parameters = [p for p in resumed.parameters() if p.requires_grad]
    resumed_optimizer = torch.optim.Adam(parameters, lr=1e-2)
    resume_checkpoint(resumed, tmp_path / "last.pth.tar", resumed_optimizer)
    assert [p for p in resumed.parameters() if p.requires_grad] == parameters  # the optimizer's own tensors
    for (name, layer), (_, source) in zip(trained.named_modules(), resumed.named_modules()):
        if hasattr(layer, "grft_updates"):
            assert torch.equal(layer.grft_updates["default"].indices, source.grft_updates["default"].indices), name
    x = images(3, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(resumed.eval()(x), trained.eval()(x))
    for model, opt in ((trained, optimizer), (resumed, resumed_optimizer)):  # one more step each: the same
        model.train()
        opt.zero_grad()
        model(images(2)).sum().backward()
        opt.step()
    with torch.no_grad():
        torch.testing.assert_close(resumed.eval()(x), trained.eval()(x))


# ------------------------------------------------------------------ errors that used to be tracebacks
def _saved_row_adapter(tmp_path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a freshly saved row adapter of the tiny ViT (k = 1)."""
    model = make_model("vit")
    apply_grft(model, random_scores(model), GRFTConfig(k=1))
    path = save_adapter(model, tmp_path / "a.safetensors")
    with safe_open(str(path), "pt") as handle:
        return load_file(path), handle.metadata()


def test_malformed_fingerprints_in_an_adapter_are_an_adapter_error(tmp_path):
    tensors, metadata = _saved_row_adapter(tmp_path)
    for broken in ({"x": 1}, {"x": {"sums": "abc"}}, [], {"x": {"sums": [1, 2]}}):
        base = json.loads(metadata["base_model"])
        base["fingerprints"] = broken
        save_file(tensors, tmp_path / "b.safetensors", metadata={**metadata, "base_model": json.dumps(base)})
        with pytest.raises(AdapterError, match="fingerprints metadata is malformed"):
            load_adapter(make_model("vit"), tmp_path / "b.safetensors")


def test_non_finite_values_in_an_adapter_file_are_refused(tmp_path):
    tensors, metadata = _saved_row_adapter(tmp_path)
    for key in (next(k for k in tensors if k.endswith(".grft_delta")), "head.weight"):
        broken = dict(tensors)
        broken[key] = broken[key].clone()
        broken[key].view(-1)[0] = float("nan")
        save_file(broken, tmp_path / "nan.safetensors", metadata=metadata)
        with pytest.raises(AdapterError, match="holds NaN or inf"):
            load_adapter(make_model("vit"), tmp_path / "nan.safetensors")


def test_a_very_long_adapter_name_and_a_directory_as_a_file_are_clear_errors(tmp_path):
    model = make_model("vit")
    with pytest.raises(ConfigError, match="at most 64 characters"):
        apply_grft(model, random_scores(model), GRFTConfig(k=1), adapter_name="a" * 300)
    apply_grft(model, random_scores(model), GRFTConfig(k=1))
    with pytest.raises(AdapterError, match="is a directory"):
        save_adapter(model, tmp_path)


def test_scores_on_the_meta_device_are_a_selection_error():
    model = make_model("vit")
    meta = {name: score.to("meta") for name, score in random_scores(model).items()}
    with pytest.raises(SelectionError, match="meta device"):
        apply_grft(model, meta, GRFTConfig(k=1))
