"""benchmarks/transfer.py: the offline pre-train -> fine-tune pipeline runs end to end in --quick mode and
writes a sane table, plot and JSON (this checks the pipeline, never the accuracies)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

_DIR = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    if name not in sys.modules:
        sys.path.insert(0, str(_DIR))
        spec = importlib.util.spec_from_file_location(name, _DIR / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


transfer_data = _load("transfer_data")
transfer = _load("transfer")


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
    for method in transfer.DEFAULT_METHODS:
        assert f"| {transfer.METHODS[method].label} |" in table
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
    assert list(beyond["methods"]) == list(transfer.SUITES["beyond"])
    by = {(r["target"], r["method"]): r for r in beyond["runs"]}
    for target in transfer.QUICK.targets:
        row_k1 = by[(target, "grft-row-k1")]["trainable"]
        for method in transfer.SUITES["beyond"]:
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
    settings = transfer.QUICK
    runs = results["runs"]
    assert len(runs) == len(settings.targets) * len(transfer.DEFAULT_METHODS) * len(settings.seeds)
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
        count = {m: by[(target, m, seed)]["trainable"] for m in transfer.DEFAULT_METHODS}
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
            lora["lora_trainable"] - 10 * (transfer.QUICK.embed_dim + 1))
    assert results["lora"]["lora_trainable"] == pytest.approx(results["lora"]["grft_row_k1_trainable"], rel=0.35)


def test_selection_record_orders_gradient_random_lowest(quick):
    _, _, results = quick
    for run in results["runs"]:
        info = run["info"]
        if run["method"] == "grft-row-k1-n4":
            assert len(info["subset_losses"]) == transfer.QUICK.num_subsets
        if run["method"] in ("grft-row-k1", "random-row-k1", "lowest-row-k1"):
            assert 0.0 <= info["chosen_share_mean"] <= 1.0
    selection = results["summary"]["selection"]
    # the same seed gives the same gradient scores, so the top rows hold the most of them, the lowest the least
    assert selection["grft-row-k1"]["chosen_share"] >= selection["random-row-k1"]["chosen_share"]
    assert selection["random-row-k1"]["chosen_share"] >= selection["lowest-row-k1"]["chosen_share"]
    assert selection["grft-row-k1"]["chosen_share"] > selection["grft-row-k1"]["uniform_share"]
    paired = results["summary"]["paired"]["grft-row-k1 - random-row-k1"]
    assert paired["pairs"] == len(transfer.QUICK.targets) * len(transfer.QUICK.seeds)
    means = results["summary"]["methods"]["grft-row-k1"]["mean"]
    assert means is not None and 0.0 <= means[0] <= 100.0


def test_registry_accepts_a_new_method():
    settings = transfer.QUICK
    data = transfer_data.make_target("count", 24, 8, seed=0, size=settings.img_size)
    torch.manual_seed(0)
    state = transfer.build_vit(settings, transfer_data.source_num_classes()).state_dict()

    @transfer.register("test-last-block", "Last block only (test)", "grft", "other", cost=0.1)
    def prepare(model, ctx):
        model.requires_grad_(False)
        model.blocks[-1].requires_grad_(True)
        model.head.requires_grad_(True)
        return transfer.Prepared(model, [p for p in model.parameters() if p.requires_grad], info={"note": "x"})

    try:
        result = transfer.finetune(transfer.Job("count", "test-last-block", 0, 1e-3, 0.0), settings, state, data, 1)
    finally:
        del transfer.METHODS["test-last-block"]
    assert result["info"] == {"note": "x"} and 0.0 <= result["top1"] <= 1.0 and result["test_images"] == 8
    assert result["trainable"] == sum(p.numel() for p in transfer.build_vit(settings, 6).blocks[-1].parameters()) + (
        6 * (settings.embed_dim + 1))


def test_a_salience_method_is_one_registration():
    """Another importance measure plugs in as a GRFT-family row: top-k of its scores, wrapped and trained."""
    settings = transfer.QUICK
    data = transfer_data.make_target("digits", 24, 8, seed=0, size=settings.img_size)
    torch.manual_seed(0)
    state = transfer.build_vit(settings, transfer_data.source_num_classes()).state_dict()
    seen = []

    def magnitude(model, ctx, config):  # |W|: a data-free salience
        seen.append(config.structure)
        return {f"{name}.weight": layer.weight.detach().abs()
                for name, layer in transfer.find_target_layers(model, config).items()}

    transfer.register("test-magnitude-row-k1", "Magnitude rows k=1 (test)", "grft", "other")(
        transfer.grft_method("row", 1, chooser=magnitude))
    try:
        result = transfer.finetune(transfer.Job("digits", "test-magnitude-row-k1", 0, 1e-2, 1e-4), settings, state,
                                   data, 1)
    finally:
        del transfer.METHODS["test-magnitude-row-k1"]
    assert seen == ["row"] and 0.0 <= result["top1"] <= 1.0
    assert result["info"]["report_trainable"] == result["trainable"]
    assert 0.0 <= result["info"]["chosen_share_mean"] <= 1.0  # the share of the SupCon scores it picked


def test_pretrain_cache_is_keyed_by_settings(tmp_path):
    import dataclasses

    tiny = dataclasses.replace(transfer.QUICK, source_images=32, source_val_images=16, pretrain_batch_size=16)
    state, info = transfer.pretrain(tiny, tmp_path, log=lambda _: None)
    assert info["from_cache"] is False and len(list(tmp_path.glob("vit-*.pt"))) == 1
    again, info2 = transfer.pretrain(tiny, tmp_path, log=lambda _: None)
    assert info2["from_cache"] is True and info2["seconds"] == pytest.approx(info["seconds"])
    assert all(torch.equal(state[k], again[k]) for k in state)
    other = dataclasses.replace(tiny, pretrain_seed=1)
    assert other.pretrain_key() != tiny.pretrain_key()


def test_data_parallel_pretraining_in_two_processes(tmp_path):
    import dataclasses

    tiny = dataclasses.replace(transfer.QUICK, source_images=64, source_val_images=16, pretrain_batch_size=16)
    state, info = transfer.pretrain(tiny, None, log=lambda _: None, workers=2, log_file=tmp_path / "log.txt")
    assert info["workers"] == 2 and info["steps"] == 64 // 16 and info["batch_size"] == 16
    assert "pre-training epoch 1/1" in (tmp_path / "log.txt").read_text()
    model = transfer.load_backbone(transfer.build_vit(tiny, 3), state)
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
