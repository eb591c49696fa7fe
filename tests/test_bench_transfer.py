"""benchmarks/transfer.py (the package benchmarks/transfer_bench/): the offline pre-train -> fine-tune
pipeline runs end to end in --quick mode and writes a sane table, plot and JSON (this checks the pipeline,
never the accuracies)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import load_benchmark
from grft_vision.tuner.targets import find_target_layers

transfer = load_benchmark("transfer")  # the entry script; its package is imported by name, as its workers do
transfer_data = load_benchmark("transfer_bench.data")
jobs = load_benchmark("transfer_bench.jobs")
methods = load_benchmark("transfer_bench.methods")
vit = load_benchmark("transfer_bench.model")
pretraining = load_benchmark("transfer_bench.pretrain")
presets = load_benchmark("transfer_bench.settings")
width_sweep = load_benchmark("transfer_bench.sweep")
sweep_statistics = load_benchmark("transfer_bench.sweep_statistics")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One --quick run through the command line entry point, in this process (one worker)."""
    root = tmp_path_factory.mktemp("transfer")
    out, cache = root / "out", root / "cache"
    assert transfer.main(["--quick", "--out", str(out), "--cache-dir", str(cache), "--workers", "1", "--quiet"]) == 0
    return out, cache, json.loads((out / "results.json").read_text())


def test_quick_writes_table_plot_and_json_without_the_cache(quick):
    out, cache, results = quick
    assert not cache.exists()  # --quick neither reads nor writes the cache
    assert results["pretrain"]["from_cache"] is False
    png = (out / "accuracy_vs_trainable.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    table = (out / "table.md").read_text()
    for method in methods.DEFAULT_METHODS:
        assert f"| {methods.METHODS[method].label} |" in table
    assert "± " in table and "paired difference" in table and "selection record" in table
    timing = results["timing"]
    assert timing["pretrain_seconds"] > 0 and timing["finetune_seconds"] > 0 and timing["total_seconds"] > 0


@pytest.fixture(scope="module")
def beyond(tmp_path_factory):
    """The beyond-GRFT suite (SPEFT / ID3 / GEM scores, budgets, schedules), --quick, one seed."""
    out = tmp_path_factory.mktemp("transfer-beyond")
    assert transfer.main(["--quick", "--suite", "beyond", "--seeds", "0", "--out", str(out), "--workers", "1",
                          "--quiet"]) == 0
    return json.loads((out / "results.json").read_text())


def test_beyond_suite_runs_every_score_budget_and_schedule_at_grfts_budget(beyond):
    assert list(beyond["methods"]) == list(methods.SUITES["beyond"])
    by = {(r["target"], r["method"]): r for r in beyond["runs"]}
    for target in presets.QUICK.targets:
        row_k1 = by[(target, "grft-row-k1")]["trainable"]
        for method in methods.SUITES["beyond"]:
            run = by[(target, method)]
            assert 0.0 <= run["top1"] <= 1.0
            assert run["info"]["report_trainable"] == run["trainable"]
            if method.startswith(("score-", "loss-", "schedule-dynamic")):
                assert run["trainable"] == row_k1, method  # one row per layer, whatever scores it
        # budgets spend at most row k=1's row parameters; layers given no row also keep their biases frozen
        for method in ("budget-global", "budget-entropy"):
            assert 0 < by[(target, method)]["trainable"] <= row_k1
        incremental = by[(target, "schedule-incremental-k2")]
        assert incremental["trainable"] == by[(target, "grft-row-k2")]["trainable"]
        assert incremental["info"]["schedule_events"] == 4
        dynamic = by[(target, "schedule-dynamic")]["info"]
        assert dynamic["schedule_events"] == 3  # at 1/4, 2/4 and 3/4 of the run
    paired = beyond["summary"]["paired"]
    assert "score-snip - random-row-k1" in paired and "schedule-incremental-k2 - grft-row-k2" in paired


def test_every_job_ran_with_sane_values(quick):
    _, _, results = quick
    settings = presets.QUICK
    runs = results["runs"]
    assert len(runs) == len(settings.targets) * len(methods.DEFAULT_METHODS) * len(settings.seeds)
    keys = {(r["target"], r["method"], r["seed"]) for r in runs}
    assert len(keys) == len(runs)
    for run in runs:
        assert 0.0 <= run["top1"] <= 1.0
        assert 0 < run["trainable"] <= run["total"]
        assert run["test_images"] == settings.num_test and run["train_images"] == settings.num_train
        if "report_trainable" in run["info"]:  # GRFT family: the library's count is the optimiser's count
            assert run["info"]["report_trainable"] == run["trainable"]
    by = {(r["target"], r["method"], r["seed"]): r for r in runs}
    for target in settings.targets:
        seed = settings.seeds[0]
        count = {m: by[(target, m, seed)]["trainable"] for m in methods.DEFAULT_METHODS}
        assert count["full"] == by[(target, "full", seed)]["total"]
        assert count["linear"] == by[(target, "linear", seed)]["head_params"]
        assert count["linear"] < count["bias"] < count["grft-row-k1"] < count["grft-row-k2"] < count["full"]
        # controls and ablations train exactly the budget of the row they control
        for name in ("random-row-k1", "lowest-row-k1", "grft-row-k1-n4", "grft-row-k1-noL2"):
            assert count[name] == count["grft-row-k1"]
        assert count["random-row-k2"] == count["grft-row-k2"]
        assert count["random-row-k1-nobias"] == count["grft-row-k1-nobias"] < count["grft-row-k1"]
        lora = results["lora"]
        assert by[(target, "lora", seed)]["info"]["lora_rank"] == lora["rank"] >= 1
        assert count["lora"] - by[(target, "lora", seed)]["head_params"] == (
            lora["lora_trainable"] - 10 * (presets.QUICK.embed_dim + 1))
    assert results["lora"]["lora_trainable"] == pytest.approx(results["lora"]["grft_row_k1_trainable"], rel=0.35)


def test_selection_record_orders_gradient_random_lowest(quick):
    _, _, results = quick
    for run in results["runs"]:
        info = run["info"]
        if run["method"] == "grft-row-k1-n4":
            assert len(info["subset_losses"]) == presets.QUICK.num_subsets
        if run["method"] in ("grft-row-k1", "random-row-k1", "lowest-row-k1"):
            assert 0.0 <= info["chosen_share_mean"] <= 1.0
    selection = results["summary"]["selection"]
    # the same seed gives the same gradient scores, so the top rows hold the most of them, the lowest the least
    assert selection["grft-row-k1"]["chosen_share"] >= selection["random-row-k1"]["chosen_share"]
    assert selection["random-row-k1"]["chosen_share"] >= selection["lowest-row-k1"]["chosen_share"]
    assert selection["grft-row-k1"]["chosen_share"] > selection["grft-row-k1"]["uniform_share"]
    paired = results["summary"]["paired"]["grft-row-k1 - random-row-k1"]
    assert paired["pairs"] == len(presets.QUICK.targets) * len(presets.QUICK.seeds)
    means = results["summary"]["methods"]["grft-row-k1"]["mean"]
    assert means is not None and 0.0 <= means[0] <= 100.0


def test_registry_accepts_a_new_method():
    settings = presets.QUICK
    data = transfer_data.make_target("count", 24, 8, seed=0, size=settings.img_size)
    torch.manual_seed(0)
    state = vit.build_vit(settings, transfer_data.source_num_classes()).state_dict()

    @methods.METHODS.register("test-last-block", label="Last block only (test)", family="grft", group="other",
                              cost=0.1)
    def prepare(model, ctx):
        model.requires_grad_(False)
        model.blocks[-1].requires_grad_(True)
        model.head.requires_grad_(True)
        return methods.Prepared(model, [p for p in model.parameters() if p.requires_grad], info={"note": "x"})

    try:
        result = jobs.finetune(jobs.Job("count", "test-last-block", 0, 1e-3, 0.0), settings, state, data, 1)
    finally:
        methods.METHODS.unregister("test-last-block")
    assert result["info"] == {"note": "x"} and 0.0 <= result["top1"] <= 1.0 and result["test_images"] == 8
    assert result["trainable"] == sum(p.numel() for p in vit.build_vit(settings, 6).blocks[-1].parameters()) + (
        6 * (settings.embed_dim + 1))


def test_a_salience_method_is_one_registration():
    """Another importance measure plugs in as a GRFT-family row: top-k of its scores, wrapped and trained."""
    settings = presets.QUICK
    data = transfer_data.make_target("digits", 24, 8, seed=0, size=settings.img_size)
    torch.manual_seed(0)
    state = vit.build_vit(settings, transfer_data.source_num_classes()).state_dict()
    seen = []

    def magnitude(model, ctx, config):  # |W|: a data-free salience
        seen.append(config.structure)
        return {f"{name}.weight": layer.weight.detach().abs()
                for name, layer in find_target_layers(model, config).items()}

    methods.METHODS.register("test-magnitude-row-k1", label="Magnitude rows k=1 (test)", family="grft",
                             group="other")(methods.grft_method("row", 1, chooser=magnitude))
    try:
        result = jobs.finetune(jobs.Job("digits", "test-magnitude-row-k1", 0, 1e-2, 1e-4), settings, state, data, 1)
    finally:
        methods.METHODS.unregister("test-magnitude-row-k1")
    assert seen == ["row"] and 0.0 <= result["top1"] <= 1.0
    assert result["info"]["report_trainable"] == result["trainable"]
    assert 0.0 <= result["info"]["chosen_share_mean"] <= 1.0  # the share of the SupCon scores it picked


def test_pretrain_cache_is_keyed_by_settings(tmp_path):
    import dataclasses

    tiny = dataclasses.replace(presets.QUICK, source_images=32, source_val_images=16, pretrain_batch_size=16)
    state, info = pretraining.pretrain(tiny, tmp_path, log=lambda _: None)
    assert info["from_cache"] is False and len(list(tmp_path.glob("vit-*.pt"))) == 1
    again, info2 = pretraining.pretrain(tiny, tmp_path, log=lambda _: None)
    assert info2["from_cache"] is True and info2["seconds"] == pytest.approx(info["seconds"])
    assert all(torch.equal(state[k], again[k]) for k in state)
    assert info["sha256"] == info2["sha256"] == pretraining.state_sha256(state)  # the weights' identity, recomputed
    again["cls_token"] = again["cls_token"] + 1e-6
    assert pretraining.state_sha256(again) != info["sha256"]
    other = dataclasses.replace(tiny, pretrain_seed=1)
    assert other.pretrain_key() != tiny.pretrain_key()


def test_data_parallel_pretraining_in_two_processes(tmp_path):
    import dataclasses

    tiny = dataclasses.replace(presets.QUICK, source_images=64, source_val_images=16, pretrain_batch_size=16)
    state, info = pretraining.pretrain(tiny, None, log=lambda _: None, workers=2, log_file=tmp_path / "log.txt")
    assert info["workers"] == 2 and info["steps"] == 64 // 16 and info["batch_size"] == 16
    assert "pre-training epoch 1/1" in (tmp_path / "log.txt").read_text()
    model = vit.load_backbone(vit.build_vit(tiny, 3), state)
    assert model(torch.zeros(1, 3, tiny.img_size, tiny.img_size)).shape == (1, 3)
    assert tiny.pretrain_key(2) != tiny.pretrain_key(1)


def test_target_data_is_few_shot_balanced_and_reproducible():
    for name in transfer_data.TARGETS:
        data = transfer_data.make_target(name, 40, 20, seed=3, size=32)
        again = transfer_data.make_target(name, 40, 20, seed=3, size=32)
        assert data.train_images.shape == (40, 32, 32, 3) and data.train_images.dtype == np.uint8
        assert np.array_equal(data.train_images, again.train_images)
        assert np.array_equal(data.test_labels, again.test_labels)
        assert data.train_labels.max() < data.num_classes and len(data.test_labels) == 20
        val = data.split_validation()
        assert len(val.train_labels) == 32 and len(val.test_labels) == 8
    images, labels = transfer_data.make_source(10, seed=0)
    assert images.shape == (10, 32, 32, 3) and list(labels) == list(range(10))


def test_random_rows_are_drawn_per_target_and_per_seed(quick):
    _, _, results = quick
    first = methods.random_generator("count", 0).initial_seed()
    assert first == methods.random_generator("count", 0).initial_seed()  # reproducible
    assert len({first, methods.random_generator("digits", 0).initial_seed(),
                methods.random_generator("count", 1).initial_seed()}) == 3
    random_rows = results["summary"]["selection"]["random-row-k1"]
    # one row of 32-96 per layer: independent draws rarely coincide (the old control gave 1.0 across targets)
    assert random_rows["jaccard_across_targets"] < 0.5 and random_rows["jaccard_across_seeds"] < 0.5


def test_device_without_cuda_is_a_clear_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit, match="--device cuda: torch sees no such device"):
        transfer.main(["--quick", "--device", "cuda", "--out", str(tmp_path)])


# ------------------------------------------------------------------------------------------ width sweep
@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory):
    """The --quick width sweep (2 widths x 2 pre-training seeds) through the command line, one worker."""
    out = tmp_path_factory.mktemp("sweep")
    assert transfer.main(["--sweep", "--quick", "--out", str(out), "--workers", "1", "--quiet"]) == 0
    return out, json.loads((out / "sweep.json").read_text())


def test_quick_sweep_runs_every_width_checkpoint_and_method(sweep_run):
    out, results = sweep_run
    spec = width_sweep.QUICK_SWEEP
    assert list(results["checkpoints"]) == [width_sweep.checkpoint_name(w, s) for w in spec.widths
                                            for s in spec.pretrain_seeds]
    assert results["code"]["commit"] and len(results["code"]["commit"]) == 40
    assert "--sweep" in results["command"] and results["sweep"]["widths"] == list(spec.widths)
    png = (out / "width_sweep.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    summary = results["summary"]
    assert list(summary["widths"]) == [str(w) for w in spec.widths]
    for width, entry in summary["widths"].items():
        checkpoints = entry["checkpoints"]
        assert entry["num_heads"] == int(width) // spec.head_dim and len(checkpoints) == len(spec.pretrain_seeds)
        hashes = {c["sha256"] for c in checkpoints.values()}
        assert len(hashes) == len(checkpoints) and all(len(h) == 64 for h in hashes)  # one checkpoint per seed
        for ckpt in checkpoints.values():
            assert 0.0 <= ckpt["source_val_top1"] <= 100.0
            assert set(ckpt["methods"]) == set(sweep_statistics.SWEEP_METHODS)
        for pair in summary["pairs"]:
            pooled = entry["pooled"]["paired"][pair]
            parts = [c["paired"][pair] for c in checkpoints.values()]
            assert pooled["units"] == sum(p["units"] for p in parts) == 2 * len(presets.QUICK.seeds)
            for key in ("wins", "ties", "losses", "pairs"):
                assert pooled[key] == sum(p[key] for p in parts)
            assert pooled["mean"] == pytest.approx(np.mean([p["mean"] for p in parts]))  # equal units per checkpoint
            assert pooled["ci95"][0] <= pooled["mean"] <= pooled["ci95"][1]
    table = (out / "sweep.md").read_text()
    assert table == sweep_statistics.sweep_markdown(summary) and "**pooled**" in table


def test_sweep_summary_is_recomputed_from_the_per_job_results(sweep_run):
    out, results = sweep_run
    stored, runs = width_sweep.load_sweep(out)
    assert stored == results
    assert json.loads(json.dumps(sweep_statistics.summarise_sweep(runs))) == results["summary"]
    for name, run in runs.items():  # every checkpoint's file holds its raw jobs, code version and hash
        assert len(run["runs"]) == len(run["settings"]["targets"]) * len(run["methods"]) * len(run["settings"]["seeds"])
        assert run["pretrain"]["sha256"] == results["summary"]["widths"][str(run["settings"]["embed_dim"])][
            "checkpoints"][name]["sha256"]


def test_an_interrupted_sweep_resumes_without_rerunning(sweep_run):
    out, results = sweep_run
    assert transfer.main(["--sweep", "--quick", "--out", str(out), "--workers", "1", "--quiet"]) == 0
    again = json.loads((out / "sweep.json").read_text())
    assert again["timing"]["resumed"] == list(results["checkpoints"])
    assert again["summary"] == results["summary"]


def _fake_results(top1: dict[tuple[str, str, int], float], seeds=(0, 1, 2), targets=("a", "b")) -> dict:
    runs = [{"method": m, "target": t, "seed": s, "split": "test", "top1": v} for (m, t, s), v in top1.items()]
    return {"runs": runs, "methods": sorted({m for m, _, _ in top1}),
            "settings": {"targets": list(targets), "seeds": list(seeds)}}


def test_paired_difference_is_over_checkpoint_seed_units_with_a_t_interval():
    from scipy import stats

    gaps = {0: (0.02, 0.04), 1: (0.00, -0.01), 2: (0.03, 0.03)}  # (target a, target b) per seed
    top1 = {}
    for seed, (ga, gb) in gaps.items():
        top1.update({("x", "a", seed): 0.5 + ga, ("y", "a", seed): 0.5, ("x", "b", seed): 0.6 + gb,
                     ("y", "b", seed): 0.6})
    one = sweep_statistics.paired_difference([_fake_results(top1)], "x", "y")
    units = [100 * (ga + gb) / 2 for ga, gb in gaps.values()]  # 3, -0.5, 3 points
    assert one["mean"] == pytest.approx(np.mean(units)) and one["units"] == 3
    half = stats.t.ppf(0.975, 2) * np.std(units, ddof=1) / np.sqrt(3)
    assert one["ci95"] == pytest.approx([np.mean(units) - half, np.mean(units) + half])
    assert (one["wins"], one["ties"], one["losses"], one["pairs"]) == (4, 1, 1, 6)
    pooled = sweep_statistics.paired_difference([_fake_results(top1), _fake_results(top1)], "x", "y")
    assert pooled["units"] == 6 and pooled["pairs"] == 12 and pooled["mean"] == pytest.approx(one["mean"])
    assert pooled["ci95"][1] - pooled["ci95"][0] < one["ci95"][1] - one["ci95"][0]
    assert sweep_statistics.paired_difference([_fake_results(top1)], "x", "missing") is None
    partial = {k: v for k, v in top1.items() if k != ("x", "b", 2)}  # seed 2 lacks a target: not a unit
    assert sweep_statistics.paired_difference([_fake_results(partial)], "x", "y")["units"] == 2


def test_sweep_settings_scale_heads_and_apply_width_overrides():
    spec = width_sweep.Sweep(widths=(64, 128), per_width={128: {"pretrain_epochs": 3, "methods": ("linear",)}},
                             overrides={"seeds": (0,)})
    narrow, wide = spec.settings_at(presets.FULL, 64, 1), spec.settings_at(presets.FULL, 128, 0)
    assert (narrow.embed_dim, narrow.num_heads, narrow.pretrain_seed, narrow.seeds) == (64, 4, 1, (0,))
    assert narrow.pretrain_epochs == presets.FULL.pretrain_epochs
    assert narrow.methods == sweep_statistics.SWEEP_METHODS
    assert (wide.num_heads, wide.pretrain_epochs, wide.methods) == (8, 3, ("linear",))
    assert narrow.pretrain_lr == presets.FULL.pretrain_lr and wide.pretrain_lr == presets.FULL.pretrain_lr / 2
    assert narrow.pretrain_key() != spec.settings_at(presets.FULL, 64, 0).pretrain_key()
    with pytest.raises(ValueError, match="width 72 is not a positive multiple of the head width 16"):
        spec.settings_at(presets.FULL, 72, 0)
    with pytest.raises(SystemExit, match="add --sweep"):
        transfer.main(["--quick", "--widths", "64"])


# ------------------------------------------------------------------------------- the committed sweep
_ROOT = Path(__file__).resolve().parents[1]
SWEEP_DIR = _ROOT / "docs" / "results" / "width-sweep"
TABLE_START, TABLE_END = "<!-- width-sweep table: start -->", "<!-- width-sweep table: end -->"


def test_results_md_sweep_table_is_what_the_committed_json_gives():
    """docs/results.md's sweep tables, recomputed from the committed per-job results (the sweep is not run)."""
    stored, runs = width_sweep.load_sweep(SWEEP_DIR)
    table = sweep_statistics.sweep_markdown(sweep_statistics.summarise_sweep(runs))
    assert table == sweep_statistics.sweep_markdown(stored["summary"]) == (SWEEP_DIR / "sweep.md").read_text()
    doc = (_ROOT / "docs" / "results.md").read_text()
    assert doc.count(TABLE_START) == 1 and doc.count(TABLE_END) == 1
    assert doc.split(TABLE_START)[1].split(TABLE_END)[0].strip() == table.strip()
    # the code (of the sweep and of every checkpoint's jobs, clean checkouts) and the command are in the page
    for code in [stored["code"], *(run["code"] for run in runs.values())]:
        assert code["dirty"] is False and len(code["commit"]) == 40 and code["commit"] in doc
    assert stored["command"] in doc
    assert (SWEEP_DIR / "width_sweep.png").is_file() and "results/width-sweep/width_sweep.png" in doc


# ----------------------------------------------------------------------------- first-order share, budget study
first_order = load_benchmark("transfer_bench.first_order")
budget = load_benchmark("transfer_bench.budget")
FIRST_ORDER_QUICK_METHODS = ("grft-row-k1", "random-row-k1", "lowest-row-k1", "grft-col-k1", "budget-global",
                             "gps-sparse-k1")


@pytest.fixture(scope="module")
def first_order_run(tmp_path_factory):
    """--first-order --quick on a few methods (a sparse one among them: it has no row / column choice)."""
    out = tmp_path_factory.mktemp("first-order")
    assert transfer.main(["--first-order", "--quick", "--methods", *FIRST_ORDER_QUICK_METHODS, "--out", str(out),
                          "--workers", "1", "--quiet"]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_first_order_run_measures_every_row_and_column_choice_without_training(first_order_run):
    out, results = first_order_run
    settings = presets.QUICK
    assert len(results["runs"]) == len(FIRST_ORDER_QUICK_METHODS) * len(settings.targets) * len(settings.seeds)
    for run in results["runs"]:
        assert "top1" not in run  # selection only
        record = run["first_order"]
        if not methods.METHODS[run["method"]].chooses:
            assert record is None
            continue
        assert 0.0 <= record["chosen_sq"] <= record["oracle_sq"] and 0.0 < record["share"] <= 1.0
        assert record["share"] == pytest.approx(record["chosen_sq"] / record["oracle_sq"])
        assert 0.0 < record["uniform_share"] <= 1.0 and 0.0 < record["share_abs"] <= 1.0
        assert record["rows_part"] == pytest.approx(
            record["chosen_sq"] / (record["chosen_sq"] + record["head_sq"] + record["bias_sq"]))  # biases train
    assert "gps-sparse-k1" not in results["summary"] and set(results["summary"]) == set(FIRST_ORDER_QUICK_METHODS[:-1])
    assert json.loads(json.dumps(first_order.summarise_first_order(results["runs"], results["methods"]))) == \
        results["summary"]
    assert (out / "table.md").read_text() == first_order.first_order_markdown(results["summary"])
    # the oracle and the uniform expectation depend only on the gradient (target, seed) and the counts (k = 1)
    by = {(r["method"], r["target"], r["seed"]): r["first_order"] for r in results["runs"]}
    for target in settings.targets:
        for seed in settings.seeds:
            same = [by[(m, target, seed)] for m in ("grft-row-k1", "random-row-k1", "lowest-row-k1")]
            assert len({(r["oracle_sq"], r["uniform_sq"], r["head_sq"]) for r in same}) == 1


def test_the_oracle_rows_hold_the_whole_first_order_share():
    """Rows chosen by the squared task gradient itself are the oracle (share 1); the lowest hold the least."""
    from grft_vision import GRFTConfig, apply_grft

    settings = presets.QUICK
    data = transfer_data.make_target("count", 24, 8, seed=0, size=settings.img_size)
    torch.manual_seed(0)
    state = vit.build_vit(settings, transfer_data.source_num_classes()).state_dict()

    def fresh():
        torch.manual_seed(3)
        return vit.load_backbone(vit.build_vit(settings, data.num_classes), state)

    grads = first_order.task_gradients(fresh(), data.train_images, data.train_labels)
    config = GRFTConfig(structure="row", k=2, conv_columns="tap")
    best = {f"{n}.weight": grads[f"{n}.weight"].square() for n in find_target_layers(fresh(), config)}
    worst = {name: -score for name, score in best.items()}  # the rows of least squared gradient
    top = first_order.measure(apply_grft(fresh(), scores=best, config=config), fresh(), data.train_images,
                              data.train_labels, train_bias=True)
    low = first_order.measure(apply_grft(fresh(), scores=worst, config=config), fresh(), data.train_images,
                              data.train_labels, train_bias=False)
    assert top["share"] == pytest.approx(1.0) and set(top["per_layer"].values()) == {1.0}
    assert low["share"] < low["uniform_share"] < 1.0 and low["oracle_sq"] == pytest.approx(top["oracle_sq"])
    assert low["rows_part"] == pytest.approx(low["chosen_sq"] / (low["chosen_sq"] + low["head_sq"]))  # biases frozen


def test_recording_the_test_accuracy_during_a_run_does_not_change_it():
    settings = presets.QUICK
    data = transfer_data.make_target("digits", 32, 16, seed=0, size=settings.img_size)
    torch.manual_seed(0)
    state = vit.build_vit(settings, transfer_data.source_num_classes()).state_dict()
    plain = jobs.finetune(jobs.Job("digits", "grft-row-k1", 0, 1e-2, 1e-4), settings, state, data, 1)
    watched = jobs.finetune(jobs.Job("digits", "grft-row-k1", 0, 1e-2, 1e-4, eval_epochs=(1, 2)), settings, state,
                            data, 1)
    assert (watched["top1"], watched["final_train_loss"]) == (plain["top1"], plain["final_train_loss"])
    assert list(watched["top1_by_epoch"]) == ["1", "2"] and watched["top1_by_epoch"]["2"] == watched["top1"]
    assert plain["top1_by_epoch"] == {} and plain["first_order"] == watched["first_order"] is not None
    short = jobs.finetune(jobs.Job("digits", "grft-row-k1", 0, 1e-2, 1e-4, short_schedule=1), settings, state, data, 1)
    assert short["epochs"] == short["short_schedule"] == 1 and plain["epochs"] == 2


@pytest.fixture(scope="module")
def budget_run(tmp_path_factory):
    """--budget --quick on one target: every k x biases setting, the one run and the shorter one."""
    out = tmp_path_factory.mktemp("budget")
    assert transfer.main(["--budget", "--quick", "--targets", "count", "--out", str(out), "--workers", "1",
                          "--quiet"]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_budget_study_records_every_setting_chooser_and_budget(budget_run):
    out, results = budget_run
    study, seeds = budget.QUICK_BUDGET, presets.QUICK.seeds
    long = [r for r in results["runs"] if r["top1_by_epoch"]]
    short = [r for r in results["runs"] if r["short_schedule"]]
    assert len(long) == len(study.settings()) * len(budget.CHOOSERS) * len(seeds)
    short_settings = [s for s in study.settings() if study.has_short_runs(s)]
    assert len(short) == len(short_settings) * len(budget.CHOOSERS) * len(study.short_epochs) * len(seeds)
    for run in long:
        assert list(run["top1_by_epoch"]) == [str(e) for e in study.eval_epochs]
        assert run["top1_by_epoch"][str(run["epochs"])] == run["top1"] and run["first_order"] is not None
    summary = results["summary"]
    assert json.loads(json.dumps(budget.summarise_budget(results))) == summary
    assert (out / "table.md").read_text() == budget.budget_markdown(summary)
    png = (out / "budget.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    for setting in summary["settings"]:
        assert [(p["run"], p["epochs"]) for p in setting["points"]] == study.points(setting)
        for point in setting["points"]:
            assert set(point["methods"]) == set(budget.CHOOSERS)
            for pair in summary["pairs"]:
                entry = point["paired"][pair]
                assert entry["units"] == len(seeds) and entry["pairs"] == len(seeds)
                assert entry["ci95"][0] <= entry["mean"] <= entry["ci95"][1]
    assert all(cost["selection_epochs"] > 0 for cost in summary["costs"].values())


def test_budget_and_first_order_are_separate_runs_with_their_own_methods():
    with pytest.raises(SystemExit, match="--first-order and --budget are separate runs"):
        transfer.main(["--quick", "--first-order", "--budget"])
    with pytest.raises(SystemExit, match="--budget runs its own methods"):
        transfer.main(["--quick", "--budget", "--methods", "grft-row-k1"])


def test_a_study_can_be_repeated_on_another_checkpoint():
    cli = load_benchmark("transfer_bench.cli")
    settings = cli.settings_from_args(cli.parse_args(["--budget", "--pretrain-seed", "1"]))
    assert settings.pretrain_seed == 1 and settings.pretrain_key(2) != presets.FULL.pretrain_key(2)
    with pytest.raises(SystemExit, match="--pretrain-seeds"):
        cli.parse_args(["--sweep", "--pretrain-seed", "1"])


# ----------------------------------------------------------------------- the committed first-order and budget runs
def _doc_table(marker: str) -> str:
    doc = (_ROOT / "docs" / "results.md").read_text()
    start, end = f"<!-- {marker} table: start -->", f"<!-- {marker} table: end -->"
    assert doc.count(start) == 1 and doc.count(end) == 1
    return doc.split(start)[1].split(end)[0].strip()


@pytest.mark.parametrize("name", ["first-order", "budget", "budget-pretrain1"])
def test_results_md_first_order_and_budget_tables_are_what_the_committed_json_gives(name):
    """docs/results.md's tables, recomputed from the committed per-job results (nothing is run)."""
    folder = _ROOT / "docs" / "results" / name
    results = json.loads((folder / "results.json").read_text())
    if name == "first-order":
        summary = first_order.summarise_first_order(results["runs"], results["methods"])
        table = first_order.first_order_markdown(summary)
        assert table == first_order.first_order_markdown(results["summary"])
    else:
        summary = budget.summarise_budget(results)
        table = budget.budget_markdown(summary)
        assert table == budget.budget_markdown(results["summary"])
        assert f"results/{name}/budget.png" in (_ROOT / "docs" / "results.md").read_text()
    assert table == (folder / "table.md").read_text() and _doc_table(name) == table.strip()
    doc = (_ROOT / "docs" / "results.md").read_text()
    assert results["command"] in doc and results["code"]["commit"] in doc
    assert results["pretrain"]["sha256"][:12] in doc
