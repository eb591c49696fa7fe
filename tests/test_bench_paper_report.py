"""benchmarks/paper_report.py: run directories -> the paper's Table 1 / Table 2 layout, with the paper's GRFT row."""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import load_benchmark
from grft_vision.data import FGVC_DATASETS, VTAB_TASKS

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "paper_report.py"


report = load_benchmark("paper_report")


def _write_run(root: Path, dataset: str, seed: int, top1: float, *, method: str = "grft", percent: float = 0.25,
               config: bool = True, structure: str = "row", k: int = 1) -> Path:
    run_dir = root / dataset / f"{method}-seed{seed}"
    run_dir.mkdir(parents=True)
    metrics = {"top1": top1, "trainable_percent": percent, "dataset": dataset, "method": method,
               "structure": structure, "k": k, "history": [], "run_dir": str(run_dir)}
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    if config:
        (run_dir / "config.yaml").write_text(f"seed: {seed}\ndataset: {dataset}\n")
    return run_dir


def _row(text: str, first_cell: str) -> list[str]:
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if cells and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row {first_cell!r} in\n{text}")


@pytest.mark.parametrize("benchmark, library", [("vtab", VTAB_TASKS), ("fgvc", FGVC_DATASETS)])
def test_paper_tables_cover_the_library_datasets(benchmark, library):
    paper = report.load_paper_table(benchmark)
    columns = [name for _, names in paper.groups for name, _ in names]
    assert sorted(columns) == sorted(library) == sorted(paper.top1) == sorted(paper.trainable_percent)


def test_the_paper_row_comes_from_the_data_file(tmp_path):
    data = yaml.safe_load(report.PAPER_RESULTS.read_text())
    data["vtab"]["groups"]["Natural"]["dtd"]["top1"] = 50.0
    edited = tmp_path / "paper.yaml"
    edited.write_text(yaml.safe_dump(data, sort_keys=False))
    _write_run(tmp_path / "runs", "dtd", 42, 0.70, percent=0.22)
    out = tmp_path / "table2.md"
    assert report.main([str(tmp_path / "runs"), "--benchmark", "vtab", "--paper", str(edited), "--out", str(out)]) == 0
    text = out.read_text()
    header = _row(text, "Method")
    assert dict(zip(header, _row(text, "paper: GRFT")))["DTD"] == "50.0"
    assert dict(zip(header, _row(text, "Δ (this GRFT − paper)")))["DTD"] == "+20.0"


def test_an_incomplete_data_file_is_an_error(tmp_path, capsys):
    data = yaml.safe_load(report.PAPER_RESULTS.read_text())
    del data["fgvc"]["groups"]["FGVC"]["cub"]["trainable_percent"]
    edited = tmp_path / "paper.yaml"
    edited.write_text(yaml.safe_dump(data))
    _write_run(tmp_path / "runs", "cub", 42, 0.9)
    assert report.main([str(tmp_path / "runs"), "--benchmark", "fgvc", "--paper", str(edited)]) == 2
    assert "fgvc/cub lacks trainable_percent" in capsys.readouterr().err


def test_vtab_table_groups_seeds_and_marks_missing_tasks(tmp_path):
    for seed, value in zip((42, 43, 44), (0.70, 0.72, 0.74)):
        _write_run(tmp_path, "dtd", seed, value, percent=0.22)
    for seed, value in zip((42, 43), (0.80, 0.84)):
        _write_run(tmp_path, "clevr_count", seed, value, percent=0.33, structure="row", k=3)
    _write_run(tmp_path, "dtd", 42, 0.60, method="full", percent=100.0)
    out = tmp_path / "table2.md"
    assert report.main([str(tmp_path), "--benchmark", "vtab", "--out", str(out)]) == 0
    text = out.read_text()
    ours = _row(text, "this run: grft")
    header = _row(text, "Method")
    cell = dict(zip(header, ours))
    assert cell["DTD"] == "72.0 ± 2.0"
    assert cell["Clevr/count"] == "82.0 ± 2.8"
    assert cell["CIFAR-100"] == "—" and cell["SmallNORB/ele"] == "—"
    assert cell["Mean Acc."].startswith("77.00") and "(2/19 tasks)" in cell["Mean Acc."]
    assert cell["Mean Params. (%)"] == "0.28"
    assert cell["Natural mean"] == "72.0" and cell["Specialized mean"] == "—" and cell["Structured mean"] == "82.0"
    paper = dict(zip(header, _row(text, "paper: GRFT")))
    assert paper["DTD"] == "75.9" and paper["Clevr/count"] == "81.4" and paper["CIFAR-100"] == "69.5"
    assert paper["Mean Acc."].startswith("78.65")  # the paper's mean over the same two tasks
    delta = dict(zip(header, _row(text, "Δ (this GRFT − paper)")))
    assert delta["DTD"] == "-3.9" and delta["Clevr/count"] == "+0.6"
    full = dict(zip(header, _row(text, "this run: full")))
    assert full["DTD"] == "60.0 ± 0.0" and full["Mean Params. (%)"] == "100.00"
    assert "| grft | DTD | 3 | 42, 43, 44 | 72.00 ± 2.00 | 75.9 | -3.90 | 0.220 | 0.22 | row, 1 |" in text
    # 19 task columns + 3 group means + mean acc + mean params + the method column
    assert len(header) == 1 + 19 + 3 + 2


def test_complete_fgvc_table_uses_the_paper_means(tmp_path):
    values = {"cub": 0.90, "nabirds": 0.87, "flowers": 0.99, "dogs": 0.89, "cars": 0.91}
    for dataset, value in values.items():
        for seed in (42, 43):
            _write_run(tmp_path, dataset, seed, value, percent=1.0)
    paper = report.load_paper_table("fgvc")
    text = report.render(report.aggregate([report.load_run(p) for p in report.find_runs([tmp_path])], paper)[0], paper)
    header = _row(text, "Method")
    ours = dict(zip(header, _row(text, "this run: grft")))
    assert ours["Mean Acc."] == f"{100 * statistics.fmean(values.values()):.2f}"
    paper = dict(zip(header, _row(text, "paper: GRFT")))
    assert paper["Mean Acc."] == "91.33" and paper["Mean Params. (%)"] == "1.22"
    assert "Natural mean" not in header


def test_seed_from_metrics_or_config_and_warnings(tmp_path):
    _write_run(tmp_path, "dtd", 42, 0.7, config=False)
    _write_run(tmp_path / "again", "dtd", 42, 0.7)
    _write_run(tmp_path, "cub", 42, 0.9)  # an FGVC run in a VTAB report is reported, not averaged in
    runs = [report.load_run(p) for p in report.find_runs([tmp_path])]
    vtab = report.load_paper_table("vtab")
    table, warnings = report.aggregate(runs, vtab)
    assert sorted(r.seed is None for r in table["grft"]["dtd"].runs) == [False, True]
    assert any("'cub' is not a vtab task" in w for w in warnings)
    table, warnings = report.aggregate([r for r in runs if r.seed == 42] * 2, vtab)
    assert any("share a seed" in w for w in warnings)


def test_errors_exit_with_code_2(tmp_path, capsys):
    assert report.main([str(tmp_path / "nowhere"), "--benchmark", "vtab"]) == 2
    (tmp_path / "empty").mkdir()
    assert report.main([str(tmp_path / "empty"), "--benchmark", "vtab"]) == 2
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.json").write_text(json.dumps({"top1": 71.5, "dataset": "dtd"}))  # percent, not a fraction
    assert report.main([str(bad), "--benchmark", "vtab"]) == 2
    assert "not a fraction" in capsys.readouterr().err


def test_script_entry_point(tmp_path):
    _write_run(tmp_path, "svhn", 42, 0.9)
    result = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "--benchmark", "vtab"],
                            capture_output=True, text=True, cwd=tmp_path, check=True)
    assert "| this run: grft |" in result.stdout and "90.0 ± 0.0" in result.stdout


@pytest.mark.parametrize("script, benchmark, table, name", [
    ("reproduce_vtab.sh", "vtab", "table2.md", "dtd"),
    ("reproduce_fgvc.sh", "fgvc", "table1.md", "cub"),
])
def test_reproduce_scripts_dry_run(tmp_path, script, benchmark, table, name):
    path = REPO / "scripts" / script
    subprocess.run(["bash", "-n", str(path)], check=True)
    runs = tmp_path / "runs"
    (runs / name / "seed42").mkdir(parents=True)
    (runs / name / "seed42" / "metrics.json").write_text("{}")
    (runs / name / "seed43").mkdir(parents=True)
    (runs / name / "seed43" / "checkpoint.pt").write_text("")
    listing = "TASKS" if benchmark == "vtab" else "DATASETS"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "DRY_RUN": "1", "RUNS": str(runs), "SEEDS": "42 43 44",
           listing: name, "DATA_DIR": "/data", "EXTRA_ARGS": "--checkpoint /w.npz"}
    result = subprocess.run(["bash", str(path)], capture_output=True, text=True, env=env, check=True)
    lines = result.stdout.splitlines()
    assert f"skip {runs}/{name}/seed42 (finished: metrics.json exists)" in lines
    trainer = f"train_{benchmark}.py"
    commands = [line for line in lines if line.startswith("+ ") and trainer in line]
    assert len(commands) == 2
    assert f"--seed 43 --run-dir {runs}/{name}/seed43" in commands[0] and "--resume" in commands[0]
    assert f"--seed 44 --run-dir {runs}/{name}/seed44" in commands[1] and "--resume" not in commands[1]
    assert all(f"--dataset {name}" in c and "--checkpoint /w.npz" in c for c in commands)
    assert lines[-1] == f"+ python benchmarks/paper_report.py {runs} --benchmark {benchmark} --out {runs}/{table}"
