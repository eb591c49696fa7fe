"""Bad input through the real command line: exit code 2, one stderr line naming the value and the fix, no
traceback, and an existing run directory left byte for byte as it was."""
from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from grft_vision import files
from conftest import raise_at_epoch
from grft_vision.training import cli

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "vtab"


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by relative path, with its bytes."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def call(args: list[str], capsys) -> tuple[int, str]:
    """``train_vtab.py args`` in this process: (exit code, stderr)."""
    capsys.readouterr()
    try:
        code = cli.main("vtab", args, CONFIGS)
    except SystemExit as stop:  # argparse's own errors
        code = stop.code
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, pattern: str, expected: int = 2, prefix: str = "error: ") -> None:
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert code == expected and len(lines) == 1, err
    assert lines[0].startswith(prefix) and re.search(pattern, lines[0]), lines[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny) -> Path:
    """One finished tiny run (two epochs), shared: tests copy it before changing anything in it."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    assert cli.main("vtab", [*tiny, "--run-dir", str(run_dir)], CONFIGS) == 0
    return run_dir


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# (case, extra arguments, pattern of the one error line); every case resumes the finished run, so it must
# fail before touching it: at parse time, or in the run directory checks
RESUMING_CASES = [
    ("malformed YAML file", lambda d: ["--config", str(_write(d / "bad.yaml", "lr: [1\n"))],
     r"bad\.yaml: not valid YAML .*line \d+.*fix the file"),
    ("YAML list as a value", lambda d: ["--set", "lr=[1"], r"lr='\[1' is not a valid YAML value.*quote it"),
    ("text for an integer", lambda d: ["--set", "batch_size=abc"], r"batch_size='abc' must be an integer"),
    ("float seed", lambda d: ["--set", "seed=1.5"], r"seed=1\.5 must be an integer"),
    ("boolean epochs", lambda d: ["--set", "epochs=true"], r"epochs=True must be an integer"),
    ("drop path above 1", lambda d: ["--drop-path", "2"], r"drop_path=2\.0 must be in \[0, 1\)"),
    ("negative clip_grad", lambda d: ["--set", "clip_grad=-1"], r"clip_grad=-1 must be > 0"),
    ("zero clip_grad", lambda d: ["--set", "clip_grad=0"], r"clip_grad=0 must be > 0"),
    ("a thousand workers", lambda d: ["--workers", "1000"], r"workers=1000 must be in \[0, \d+\]"),
    ("NaN learning rate", lambda d: ["--lr", "nan"], r"lr=nan must be a finite number"),
    ("zero learning rate", lambda d: ["--lr", "0"], r"lr=0\.0 must be > 0"),
    ("image size 0", lambda d: ["--img-size", "0"], r"img_size=0 must be >= 1"),
    ("k of 0 rows", lambda d: ["--rows", "0"], r"k=0 must be an int >= 1"),
    ("fractional k above 1", lambda d: ["--set", "k=1.5"], r"k=1\.5 must be an int"),
    ("boolean for a number", lambda d: ["--set", "temperature=true"], r"temperature=True must be a finite number"),
    ("zero temperature", lambda d: ["--set", "temperature=0"], r"temperature=0 must be > 0"),
    ("text for a switch", lambda d: ["--set", "train_head=maybe"], r"train_head='maybe' must be true or false"),
    ("negative selection seed", lambda d: ["--set", "selection_seed=-1"], r"selection_seed=-1 must be >= 0"),
    ("no subsets", lambda d: ["--num-subsets", "0"], r"num_subsets=0 must be >= 1"),
    ("divergence factor below 1", lambda d: ["--divergence-factor", "0.5"], r"divergence_factor=0\.5 must be > 1"),
    ("unknown optimizer", lambda d: ["--set", "opt=adamm"], r"opt='adamm' is not a timm optimizer.*'adam'"),
    ("unknown schedule", lambda d: ["--set", "sched=cosin"], r"sched='cosin' is not a timm scheduler; use"),
    ("one mean for three channels", lambda d: ["--set", "mean=[0.5]"], r"mean=\[0\.5\] must be 3 numbers"),
    ("unknown device", lambda d: ["--device", "gpu"], r"device='gpu' is not a torch device; use cpu"),
    ("unknown dataset", lambda d: ["--dataset", "dtdd"], r"Unknown dataset 'dtdd'.*Did you mean 'dtd'"),
    ("typo in a key", lambda d: ["--set", "strucure=row"], r"unknown setting 'strucure'.*'structure'"),
    ("missing config file", lambda d: ["--config", str(d / "nope.yaml")], r"nope\.yaml does not exist; pass a YAML"),
    ("config file is a folder", lambda d: ["--config", str(d)], r"config file .* is not a file; pass a YAML file"),
    ("non-number for --rows", lambda d: ["--rows", "x"], r"argument --rows: expected a number.*--help"),
    ("resume and overwrite", lambda d: ["--overwrite"], r"--overwrite: not allowed with argument --resume"),
    ("other settings", lambda d: ["--lr", "0.5"], r"settings differ from the run in .*: lr; resume with the same"),
]


@pytest.mark.parametrize("case, extra, pattern", RESUMING_CASES, ids=[case for case, _, _ in RESUMING_CASES])
def test_bad_input_is_one_line_and_leaves_the_run_alone(case, extra, pattern, run_copy, tmp_path, capsys, tiny):
    before = snapshot(run_copy)
    code, err = call([*tiny, "--run-dir", str(run_copy), "--resume", *extra(tmp_path)], capsys)
    assert_one_line_error(code, err, pattern)
    assert snapshot(run_copy) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_machine_without_it(run_copy, capsys, tiny):
    before = snapshot(run_copy)
    code, err = call([*tiny, "--run-dir", str(run_copy), "--resume", "--device", "cuda"], capsys)
    assert_one_line_error(code, err, r"device='cuda', but CUDA is not available.*--device cpu")
    assert snapshot(run_copy) == before


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


# (case, how the run directory is damaged, pattern): resuming a damaged run is refused, the damage kept as is
DAMAGED_CASES = [
    ("config.yaml missing", lambda d: (d / "config.yaml").unlink(), r"config\.yaml is missing.*--overwrite"),
    ("config.yaml empty", lambda d: (d / "config.yaml").write_text(""), r"config\.yaml is empty.*--overwrite"),
    ("config.yaml truncated", lambda d: _truncate(d / "config.yaml"),
     r"config\.yaml (lacks \d+ settings|is not valid YAML).*--overwrite"),
    ("config.yaml not YAML", lambda d: (d / "config.yaml").write_text("lr: [\n"), r"config\.yaml is not valid YAML"),
    ("checkpoint truncated", lambda d: _truncate(d / "checkpoint.pt"),
     r"checkpoint\.pt is not a readable checkpoint .*truncated or corrupt.*--overwrite"),
    ("no checkpoint yet", lambda d: (d / "checkpoint.pt").unlink(), r"holds no checkpoint yet.*--overwrite"),
]


@pytest.mark.parametrize("case, damage, pattern", DAMAGED_CASES, ids=[case for case, _, _ in DAMAGED_CASES])
def test_resuming_a_damaged_run_is_refused(case, damage, pattern, run_copy, capsys, tiny):
    damage(run_copy)
    before = snapshot(run_copy)
    code, err = call([*tiny, "--run-dir", str(run_copy), "--resume"], capsys)
    assert_one_line_error(code, err, pattern)
    assert snapshot(run_copy) == before


def test_reused_run_directory_is_refused(run_copy, capsys, tiny):
    before = snapshot(run_copy)
    code, err = call([*tiny, "--run-dir", str(run_copy), "--rows", "3"], capsys)
    assert_one_line_error(code, err, r"already holds a run \(.*config\.yaml.*\); continue it with --resume, "
                                     r"replace it with --overwrite")
    assert snapshot(run_copy) == before


def _images(folder: Path, count: int) -> list[str]:
    folder.mkdir(parents=True)
    for index in range(count):
        Image.new("RGB", (8, 8), (40 * (index % 4), 90, 7 * index)).save(folder / f"{index}.jpg")
    return [f"{folder.name}/{index}.jpg {index % 4}" for index in range(count)]


def _folder_task(root: Path, damage=None) -> Path:
    """A VTAB folder-layout root for dtd with 8 images; ``damage(task folder)`` breaks one of them."""
    task_dir = root / "dtd"
    lines = _images(task_dir / "images", 8)
    for split in ("train800", "val200", "train800val200", "test"):
        (task_dir / f"{split}.txt").write_text("\n".join(lines) + "\n")
    if damage is not None:
        damage(task_dir)
    return root


def _weights_file(path: Path, model: str, **options) -> Path:
    import timm
    from safetensors.torch import save_file

    save_file(timm.create_model(model, pretrained=False, **options).state_dict(), path)
    return path


# (case, arguments given a scratch folder, pattern): new runs that fail before they write anything
NEW_RUN_CASES = [
    ("run directory is a file", lambda d: ["--run-dir", str(_write(d / "file", "x") / "run")],
     r"file is a file, not a directory; choose another --run-dir"),
    ("k larger than a layer", lambda d: ["--rows", "100000"], r"k=100000 is larger than layer .*Use k <="),
    ("patterns that match nothing", lambda d: ["--set", "target_modules=[nothing*]"],
     r"matches target_modules=\['nothing\*'\].*Check the patterns"),
    ("head that does not exist", lambda d: ["--set", "head_modules=[nohead]"], r"head_modules=\['nohead'\] matches no"),
    ("image size too small", lambda d: ["--img-size", "7"], r"img_size=7 does not fit 'test_vit'.*larger"),
    ("data folder that is a file", lambda d: ["--dataset", "dtd", "--layout", "folder", "--data-dir",
                                              str(_write(d / "data", "x"))],
     r"'dtd' \(folder layout\): expected the list file .*is not a folder.*layout is"),
    ("malformed list file", lambda d: ["--dataset", "dtd", "--data-dir", str(_folder_task(
        d / "vtab", lambda t: (t / "train800val200.txt").write_text("only-a-path.jpg\n")))],
     r"train800val200\.txt, line 1: expected 'relative/path\.jpg label'.*fix or remove"),
    ("truncated safetensors checkpoint", lambda d: ["--checkpoint", str(_truncated(_weights_file(
        d / "w.safetensors", "test_vit", img_size=32)))], r"w\.safetensors .*(truncated|corrupt)"),
    ("checkpoint of another model", lambda d: ["--checkpoint", str(_weights_file(d / "r.safetensors", "resnet18"))],
     r"r\.safetensors does not fit 'test_vit'.*not in the file \(blocks\..*ResNet-style.*--model"),
]


def _truncated(path: Path) -> Path:
    _truncate(path)
    return path


@pytest.mark.parametrize("case, extra, pattern", NEW_RUN_CASES, ids=[case for case, _, _ in NEW_RUN_CASES])
def test_bad_new_run_is_one_line_and_writes_nothing(case, extra, pattern, tmp_path, capsys, tiny):
    run_dir = tmp_path / "new-run"
    code, err = call([*tiny, "--run-dir", str(run_dir), *extra(tmp_path)], capsys)
    assert_one_line_error(code, err, pattern)
    assert not run_dir.exists() or not any(run_dir.iterdir())  # the same command works again once fixed


@pytest.mark.parametrize("damage, pattern", [
    (lambda t: (t / "images" / "3.jpg").unlink(), r"image .*images/3\.jpg \(sample 3\) does not exist; restore"),
    (lambda t: (t / "images" / "3.jpg").write_bytes(b"not a jpeg"), r"image .*images/3\.jpg \(sample 3\) cannot be "
                                                                      r"read .*replace the file"),
], ids=["missing image", "corrupt image"])
@pytest.mark.parametrize("workers", ["0", "2"])
def test_bad_image_names_the_file(damage, pattern, workers, tmp_path, capsys, tiny):
    data = _folder_task(tmp_path / "vtab", damage)
    code, err = call([*tiny, "--dataset", "dtd", "--data-dir", str(data), "--workers", workers,
                      "--run-dir", str(tmp_path / "run")], capsys)
    assert_one_line_error(code, err, pattern)


def test_full_disk_is_one_line_and_leaves_no_temporary_file(tmp_path, capsys, monkeypatch, tiny):
    def full(descriptor):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full)
    code, err = call([*tiny, "--run-dir", str(tmp_path / "run")], capsys)
    assert_one_line_error(code, err, r"no space left on the device while writing .*config\.yaml; free some space")
    assert not (tmp_path / "run").exists()  # the folder the run created is gone again, no temporary file left


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs Linux's read-only /sys")
def test_unwritable_run_directory(capsys, tiny):
    code, err = call([*tiny, "--run-dir", "/sys/grft-vision-run"], capsys)
    assert_one_line_error(code, err, r"(permission denied: /sys/grft-vision-run|/sys is not writable); choose")


@pytest.mark.parametrize("at_epoch, pattern", [
    (0, r"stopped before the first checkpoint of .*; start again with --overwrite"),
    (1, r"the last checkpoint is .*checkpoint\.pt; continue with the same command plus --resume"),
])
def test_ctrl_c_names_the_checkpoint_and_exits_130(at_epoch, pattern, run_copy, capsys, monkeypatch, tiny):
    raise_at_epoch(monkeypatch, at_epoch, KeyboardInterrupt)
    code, err = call([*tiny, "--run-dir", str(run_copy), "--overwrite"], capsys)
    assert_one_line_error(code, err, pattern, expected=130, prefix="interrupted: ")
    assert (run_copy / "checkpoint.pt").exists() == (at_epoch == 1)  # --overwrite removed the old run's


def _cli(args: list[str], **options) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([sys.executable, str(ROOT / "train_vtab.py"), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **options)


@pytest.mark.parametrize("extra, pattern", [
    (["--set", "seed=1.5"], r"seed=1\.5 must be an integer"),
    ([], r"already holds a run"),
], ids=["float seed", "reused run directory"])
def test_bad_input_through_the_script(extra, pattern, run_copy, tiny):
    before = snapshot(run_copy)
    done = _cli([*tiny, "--run-dir", str(run_copy), *extra])
    _, err = done.communicate(timeout=300)
    assert_one_line_error(done.returncode, err, pattern)
    assert snapshot(run_copy) == before


@pytest.mark.slow
def test_sigint_through_the_script_names_the_checkpoint(tmp_path, tiny):
    run_dir = tmp_path / "run"
    process = _cli([*tiny, "--epochs", "50", "--run-dir", str(run_dir)])
    while not (run_dir / "checkpoint.pt").exists() and process.poll() is None:
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=300)
    assert_one_line_error(process.returncode, err, r"the last checkpoint is .*checkpoint\.pt; continue with the "
                                                   r"same command plus --resume", expected=130, prefix="interrupted: ")
