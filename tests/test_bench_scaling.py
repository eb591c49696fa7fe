"""benchmarks/scaling.py: the full-size plan (commands of step_cost.py / llm_step_cost.py) and a tiny sweep on the CPU
that writes its tables and plot and continues where it stopped (never the speed)."""
from __future__ import annotations

import dataclasses
import json
import shlex
from pathlib import Path

import pytest

from conftest import load_benchmark

scaling = load_benchmark("scaling")
step_cost = load_benchmark("step_cost")
llm_step_cost = load_benchmark("llm_step_cost")


def _commands(capsys, *args: str) -> list[list[str]]:
    assert scaling.main(["--dry-run", *args]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("# ")
    return [shlex.split(line) for line in lines[:-1]]


def _parsed(commands: list[list[str]]):
    """(vision args, llm args) of the commands, each parsed by its own script."""
    vision, llm = [], []
    for command in commands:
        assert command[0] == "python"
        script = Path(command[1]).name
        assert script in ("step_cost.py", "llm_step_cost.py")
        (vision if script == "step_cost.py" else llm).append(
            (step_cost if script == "step_cost.py" else llm_step_cost).parse_args(command[2:]))
    return vision, llm


def test_dry_run_lists_the_full_size_configurations(capsys, tmp_path):
    vision, llm = _parsed(_commands(capsys, "--out-dir", str(tmp_path), "--device", "cpu"))
    for args in vision + llm:
        assert args.methods == list(scaling.METHODS) and (args.repeats, args.warmup) == (5, 2)
        assert Path(args.out).parent == tmp_path / "configs" and args.markdown == str(Path(args.out).with_suffix(".md"))
    ks = {(args.model, args.batch_size, args.k) for args in vision}
    base = "vit_base_patch16_224"
    assert ks == ({(base, 8, k) for k in (1, 4, 16, 64)}  # k sweep
                  | {(f"vit_{size}_patch16_224", 8, 1) for size in ("small", "base", "large")}  # model sweep
                  | {(base, batch, 1) for batch in (2, 8, 32)})  # batch sweep; ViT-B/16, batch 8, k = 1 once
    assert len(vision) == len(ks) == 8
    assert all(args.clamp_k and args.img_size == 224 for args in vision)  # columns k > 3 of the patch embedding
    shapes = [llm_step_cost.workload_from_args(args).shape for args in llm]
    assert shapes[0] == llm_step_cost.PRESETS["cpu-100m"]  # width 768 is the LLM table's default model
    assert shapes[1] == dataclasses.replace(shapes[0], hidden=1536, heads=24, kv_heads=24, intermediate=4096)
    assert all((args.batch_size, args.seq_len, args.peak_steps) == (4, 256, 0) for args in llm)


def test_reduced_and_chosen_sweeps(capsys, tmp_path):
    vision, llm = _parsed(_commands(capsys, "--reduced", "--out-dir", str(tmp_path)))
    assert {args.batch_size for args in vision} == {1, 4, 16} and {args.k for args in vision} == {1, 4, 16, 64}
    assert [args.hidden for args in llm] == [384, 768] and all(args.repeats == 3 for args in vision + llm)
    vision, llm = _parsed(_commands(capsys, "--sweeps", "k", "--ks", "2", "8", "--base-batch", "4"))
    assert [(args.k, args.batch_size) for args in vision] == [(2, 4), (8, 4)] and not llm


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("scaling")
    assert scaling.main(["--tiny", "--out-dir", str(out), "--quiet"]) == 0
    return out


def test_tiny_sweep_writes_every_sweep(tiny_run):
    data = json.loads((tiny_run / "scaling.json").read_text())
    assert not data["missing"] and list(data["sweeps"]) == list(scaling.SWEEPS)
    settings = scaling.PRESETS["tiny"]
    assert [entry["value"] for entry in data["sweeps"]["k"]] == settings["ks"]
    assert [entry["value"] for entry in data["sweeps"]["batch"]] == settings["batch_sizes"]
    assert [entry["value"] for entry in data["sweeps"]["model"]] == settings["models"]
    assert [entry["value"] for entry in data["sweeps"]["llm"]] == settings["llm_widths"]
    for entries in data["sweeps"].values():
        for entry in entries:
            methods = entry["methods"]
            assert list(methods) == list(scaling.METHODS)
            assert methods["floor"]["time_vs_floor"] == methods["floor"]["saved_vs_floor"] == 1.0
            for row in methods.values():
                assert row["step_time_s"] > 0 and row["saved_bytes"] > 0
            # columns keep only the k chosen input channels for the backward, rows every layer's input
            assert methods["grft-col"]["saved_bytes"] < methods["grft-row"]["saved_bytes"]
    # k is the swept one in the k sweep; the trainable counts grow with it
    k_rows = [entry["methods"]["grft-row"] for entry in data["sweeps"]["k"]]
    assert [row["k"] for row in k_rows] == settings["ks"]
    assert k_rows[0]["trainable_params"] < k_rows[1]["trainable_params"]
    # ViT (tiny, batch 2, k = 1) is in three sweeps and measured once
    shared = {entries[0]["config"] for entries in (data["sweeps"]["k"], data["sweeps"]["model"])}
    assert len(shared) == 1 and shared <= {entry["config"] for entry in data["sweeps"]["batch"]}
    assert len(list((tiny_run / "configs").glob("*.json"))) == 6
    table = (tiny_run / "scaling.md").read_text()
    assert table.count("### ") == 4 and "| grft-sparse |" in table
    assert (tiny_run / "scaling.png").stat().st_size > 10_000


def test_a_second_run_measures_nothing_and_other_settings_are_measured_again(tiny_run, monkeypatch):
    before = (tiny_run / "scaling.json").read_text()

    def refuse(point, out_dir):
        raise AssertionError(f"{point.id} measured again")

    monkeypatch.setattr(scaling, "measure_point", refuse)
    assert scaling.main(["--tiny", "--out-dir", str(tiny_run), "--quiet"]) == 0
    assert json.loads((tiny_run / "scaling.json").read_text())["sweeps"] == json.loads(before)["sweeps"]
    # another setting (more timed steps) is another measurement: the file there does not count for it
    with pytest.raises(AssertionError, match="measured again"):
        scaling.main(["--tiny", "--out-dir", str(tiny_run), "--quiet", "--repeats", "2"])
    # a file cut short (a killed run) is measured again as well
    config = next((tiny_run / "configs").glob("llm-*.json"))
    config.write_text(config.read_text()[:100])
    args = scaling.parse_args(["--tiny", "--out-dir", str(tiny_run)])
    points = scaling.plan(scaling.settings_of(args))
    assert [point.id for point in points if scaling.load_point(point, tiny_run) is None] == [config.stem]


def test_the_committed_run_and_its_docs_are_what_its_configurations_give():
    """docs/results/scaling (the --reduced run docs/benchmarks.md reports): its gathered sweeps come from its own
    configuration reports, and its tables are the ones in docs/benchmarks.md (nothing is run)."""
    root = Path(__file__).resolve().parents[1]
    folder = root / "docs" / "results" / "scaling"
    committed = json.loads((folder / "scaling.json").read_text())
    settings = committed["settings"]
    points = scaling.plan(settings)
    reports = {point.id: json.loads((folder / "configs" / f"{point.id}.json").read_text()) for point in points}
    assert committed["missing"] == [] and settings["preset"] == "reduced"
    assert scaling.gather(points, reports, settings)["sweeps"] == committed["sweeps"]
    text = scaling.to_markdown(committed)
    assert text == (folder / "scaling.md").read_text()
    doc = (root / "docs" / "benchmarks.md").read_text()
    for table in text.split("\n### ")[1:]:
        assert "\n#### " + table.strip() + "\n" in doc
    assert "results/scaling/scaling.png" in doc
