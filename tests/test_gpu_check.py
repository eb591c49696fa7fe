"""scripts/gpu_check.sh on the CPU: the script parses, and --dry-run lists the CUDA tests and the quick GPU suite with
flags the benchmark scripts accept (the check itself needs a GPU machine)."""
from __future__ import annotations

import ast
import configparser
import dataclasses
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import BENCHMARKS, load_benchmark

ROOT = BENCHMARKS.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
step_cost = load_benchmark("step_cost")
llm_step_cost = load_benchmark("llm_step_cost")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHON": sys.executable})


@pytest.mark.parametrize("script", [SCRIPT, BENCHMARKS / "gpu_suite.sh"])
def test_the_scripts_parse(script):
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert os.access(script, os.X_OK)
    assert "set -euo pipefail" in script.read_text()


def test_dry_run_lists_the_cuda_tests_and_the_quick_suite(tmp_path):
    done = _run("--dry-run", "--out-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr
    tests, suite, vision, llm = (shlex.split(line) for line in done.stdout.strip().splitlines())
    assert tests[:5] == [sys.executable, "-m", "pytest", "-m", "cuda"]
    assert Path(tests[5]) == ROOT / "tests" / "test_cuda.py" and "-rs" in tests
    assert Path(tests[tests.index("--junitxml") + 1]).parent == tmp_path
    assert suite[0] == "bash" and Path(suite[1]) == BENCHMARKS / "gpu_suite.sh"
    assert suite[2:] == ["--quick", "--out-dir", str(tmp_path)]
    # the suite's own commands: every method of both tables, on CUDA, at the quick sizes, into the same folder
    assert Path(vision[1]).name == "step_cost.py" and Path(llm[1]).name == "llm_step_cost.py"
    vision_args, llm_args = step_cost.parse_args(vision[2:]), llm_step_cost.parse_args(llm[2:])
    assert Path(vision_args.out).parent == Path(llm_args.out).parent == tmp_path
    assert vision_args.device == llm_args.device == "cuda"
    assert vision_args.methods == list(step_cost.METHODS) and llm_args.methods == list(llm_step_cost.METHODS)
    assert {"shira", "supertuning"} <= set(vision_args.methods) & set(llm_args.methods)
    assert (vision_args.model, vision_args.batch_size, vision_args.repeats) == ("vit_base_patch16_224", 32, 3)
    workload = llm_step_cost.workload_from_args(llm_args)
    assert workload.shape == dataclasses.replace(llm_step_cost.LLAMA_3_2_1B, layers=4)
    assert (workload.dtype, workload.batch_size, workload.seq_len, llm_args.peak_steps) == ("bfloat16", 4, 256, 2)


def test_the_default_folder_is_dated_under_docs_gpu():
    done = _run("--dry-run")
    assert done.returncode == 0, done.stderr
    junit = shlex.split(done.stdout.splitlines()[0])[-1]
    assert Path(junit).parent.parent == ROOT / "docs" / "gpu" and Path(junit).parent.name.startswith("check-")


def test_the_cuda_tests_carry_the_registered_marker():
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    markers = [line.split(":")[0].strip() for line in config["tool:pytest"]["markers"].splitlines() if line.strip()]
    assert "cuda" in markers
    module = ast.parse((ROOT / "tests" / "test_cuda.py").read_text())
    assignments = {ast.unparse(node.targets[0]): ast.unparse(node.value) for node in module.body
                   if isinstance(node, ast.Assign) and len(node.targets) == 1}
    assert assignments.get("pytestmark") == "pytest.mark.cuda"


def test_without_cuda_it_stops_and_writes_nothing(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    done = _run("--out-dir", str(tmp_path / "check"))
    assert done.returncode == 2 and "no CUDA device" in done.stderr
    assert not (tmp_path / "check").exists()


def test_unknown_arguments_are_refused():
    done = _run("--fast")
    assert done.returncode == 2 and "unknown argument --fast" in done.stderr
