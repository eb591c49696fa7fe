"""benchmarks/sparse_kernels.py at a tiny shape: every formulation computes the dense reference's output and
gradients (what makes its timings comparable), the table has one line per formulation, and a formulation that
disagrees stops the script before anything is timed."""
from __future__ import annotations

import json

import pytest

from conftest import load_benchmark

sparse_kernels = load_benchmark("sparse_kernels")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("k", [1, 3])
def test_every_formulation_matches_the_dense_reference(k):
    errors = sparse_kernels.check(sparse_kernels._problem(12, 10, 7, k))
    assert set(errors) == {"gather", "csr", "dense-grad", "library"}
    assert max(errors.values()) < 1e-5


def test_the_check_catches_a_wrong_formulation(monkeypatch):
    wrong = sparse_kernels.FORMULATIONS["library"]
    monkeypatch.setitem(sparse_kernels.FORMULATIONS, "csr", lambda x, w, i, d: wrong(x, w, i, d * 2))
    assert sparse_kernels.check(sparse_kernels._problem(12, 10, 7, 2))["csr"] > 1e-3
    assert sparse_kernels.main(["--shape", "12", "10", "7", "--ks", "2", "--repeats", "1", "--warmup", "0"]) == 1


def test_the_table_has_every_formulation_and_k(tmp_path):
    out = tmp_path / "kernels.json"
    assert sparse_kernels.main(["--shape", "16", "12", "8", "--ks", "1", "2", "--repeats", "1", "--warmup", "0",
                                "--out", str(out), "--markdown", str(tmp_path / "kernels.md")]) == 0
    text = (tmp_path / "kernels.md").read_text()
    for name in sparse_kernels.FORMULATIONS:
        assert f"| {name} |" in text
    assert "k = 1: ms" in text and "k = 2: ms" in text
    rows = json.loads(out.read_text())["rows"]
    assert {(row["formulation"], row["k"]) for row in rows} == {(n, k) for n in sparse_kernels.FORMULATIONS
                                                               for k in (1, 2)}
    assert all(row["vs_floor"] == pytest.approx(row["ms"] / next(
        r["ms"] for r in rows if r["formulation"] == "floor" and r["k"] == row["k"])) for row in rows)
