"""benchmarks/step_cost.py on a tiny ViT: the figures are right (never their speed)."""
from __future__ import annotations

import json
import statistics

import pytest
import torch

from conftest import load_benchmark

step_cost = load_benchmark("step_cost")
peers = load_benchmark("benchkit.peers")

# one torch thread: a tiny model gains nothing from more, and a shared machine's cores then cost no spin-waits
TINY = dict(num_classes=5, img_size=32, batch_size=2, repeats=2, warmup=1, model_kwargs={"depth": 2}, threads=1)


@pytest.fixture(scope="module")
def rows():
    return {row["method"]: row for row in step_cost.measure("vit_tiny_patch16_224", **TINY)}


@pytest.fixture(scope="module")
def checks(rows):
    return {check["target"]: check for check in step_cost.check_targets(list(rows.values()))}


def test_every_method_is_measured(rows):
    assert list(rows) == list(step_cost.METHODS)
    floor = rows["floor"]
    for row in rows.values():  # the reported times are the medians and ratios of the rounds (no speed asserted)
        assert len(row["step_times_s"]) == TINY["repeats"]
        assert row["step_time_s"] == statistics.median(row["step_times_s"])
        assert row["step_time_min_s"] == min(row["step_times_s"])
        assert row["time_vs_floor"] == pytest.approx(row["step_time_s"] / floor["step_time_s"])
        assert row["flops"] == row["forward_flops"] + row["backward_flops"] > 0
        assert row["peak_memory_bytes"] is None  # CPU run


def test_trainable_counts(rows):
    total = rows["full"]["total_params"]
    assert rows["full"]["trainable_params"] == total
    assert rows["floor"]["trainable_params"] == 0
    head = 192 * 5 + 5
    assert rows["head"]["trainable_params"] == head
    # vit_tiny, depth 2: per block one row of qkv/proj/fc1/fc2 (192 + 192 + 192 + 768) + their biases
    # (576 + 192 + 768 + 192); patch embedding: one 3*16*16 row + its 192 bias; the head.
    rows_k1 = 2 * ((192 + 192 + 192 + 768) + (576 + 192 + 768 + 192)) + (3 * 16 * 16 + 192) + head
    assert rows["grft-row"]["trainable_params"] == rows_k1
    # columns: one column per linear weight = its output dimension; the patch-embedding conv's column is one
    # input channel: 192 x 16 x 16 taps
    biases = 2 * (576 + 192 + 768 + 192) + 192
    cols_k1 = 2 * (576 + 192 + 768 + 192) + 192 * 16 * 16 + biases + head
    assert rows["grft-col"]["trainable_params"] == cols_k1
    # sparse k=1: one entry per row (output channel) of every weight
    sparse_k1 = 2 * (576 + 192 + 768 + 192) + 192 + biases + head
    assert rows["grft-sparse"]["trainable_params"] == sparse_k1
    # gps-dense updates exactly the entries grft-sparse trains, but every tensor requires grad
    assert rows["gps-dense"]["trainable_params"] == rows["grft-sparse"]["trainable_params"]
    assert rows["gps-dense"]["requires_grad_params"] == total
    # LoRA r=8 on qkv/proj/fc1/fc2 of 2 blocks (A: r x in, B: out x r) + the head copy
    lora = 2 * 8 * ((192 + 576) + (192 + 192) + (192 + 768) + (768 + 192)) + head
    assert rows["lora"]["trainable_params"] == lora


def test_peers_match_grft_sparse_trainable_count(rows):
    """SHiRA and Super-Tuning sit on LoRA's linears with the head trained whole, at the count nearest grft-sparse's."""
    sparse = rows["grft-sparse"]["trainable_params"]
    head = 192 * 5 + 5
    shira, supertuning = rows["shira"], rows["supertuning"]
    for row in (shira, supertuning):
        assert row["count_target"] == sparse
        assert row["trainable_params"] == row["requires_grad_params"]
    # SHiRA: r (in + out) entries per linear, one integer r; 2 * 3,072 per unit of r here, so r = 1 (7,109) is the
    # nearest grft-sparse's 8,261 (r = 2 would give 13,253): an unavoidable difference of 1,152
    per_rank = 2 * ((192 + 576) + (192 + 192) + (192 + 768) + (768 + 192))
    assert shira["count_step"] == per_rank and shira["shira_r"] == 1
    assert shira["trainable_params"] == per_rank + head
    assert abs(shira["trainable_params"] - sparse) <= per_rank / 2
    # Super-Tuning: int(numel (1 - sparsity)) entries per linear: within half a jump (<= 8 linears) of the target
    numels = 2 * [192 * 576, 192 * 192, 192 * 768, 768 * 192]
    sparsity = supertuning["supertuning_sparsity"]
    assert supertuning["trainable_params"] == sum(int(n * (1 - sparsity)) for n in numels) + head
    assert abs(supertuning["trainable_params"] - sparse) <= supertuning["count_step"] / 2 == 4
    # SHiRA keeps its positions in a plain dict (int32 [2, entries]), resident besides the model's tensors
    assert shira["extra_resident_bytes"] == 8 * per_rank and supertuning["extra_resident_bytes"] == 0


def test_peer_counts_are_the_nearest_reachable():
    from torch import nn

    layers = [nn.Linear(10, 30), nn.Linear(20, 40)]  # r: 40 + 60 = 100 entries per unit of r
    assert peers.shira_count(layers, 2) == 200
    assert peers.shira_rank(layers, 240) == 2 and peers.shira_rank(layers, 260) == 3
    assert peers.shira_rank(layers, 10) == 1  # at least 1
    assert peers.shira_rank(layers, 10**6) == 7  # r (in + out) <= in * out in every layer: 7 * 40 <= 300
    # Super-Tuning: numels 300 and 800; every count reachable with an entry in each layer (a fine grid of
    # sparsities passes every step: two steps are at least 1/2400 apart)
    reachable = {peers.supertuning_count(layers, d / 20000) for d in range(20000)
                 if int(300 * (1 - d / 20000)) >= 1}
    assert min(reachable) == 3  # one entry of the small layer, two of the large one
    for budget in (0, 1, 2, 17, 250, 333, 999, 1099):
        sparsity = peers.supertuning_sparsity(layers, budget)
        count = peers.supertuning_count(layers, sparsity)
        assert abs(count - budget) == min(abs(c - budget) for c in reachable), budget
        assert all(int(layer.weight.numel() * (1 - sparsity)) >= 1 for layer in layers)
    assert peers.supertuning_sparsity(layers, 1100) == peers.supertuning_sparsity(layers, 5000) == 0.0


@pytest.mark.parametrize("method", ["grft-row", "grft-col", "grft-sparse", "lora", "shira", "supertuning", "head"])
def test_small_methods_carry_no_dense_buffer(rows, method):
    row = rows[method]
    trainable = row["trainable_params"]
    assert row["grad_bytes"] == 4 * trainable
    moments = row["optimizer_state_bytes"] - row["optimizer_step_scalar_bytes"]
    assert moments == 2 * 4 * trainable
    assert row["grad_bytes"] + moments == step_cost.ADAM_BYTES_PER_PARAM * trainable


@pytest.mark.parametrize("method", ["full", "gps-dense"])
def test_dense_methods_carry_three_model_copies(rows, method):
    row = rows[method]
    moments = row["optimizer_state_bytes"] - row["optimizer_step_scalar_bytes"]
    assert row["grad_bytes"] + moments == 3 * 4 * row["total_params"]


def test_flops_order(rows):
    floor, full = rows["floor"]["flops"], rows["full"]["flops"]
    assert rows["head"]["flops"] < floor < full
    assert rows["gps-dense"]["flops"] == full  # the mask is applied after a dense backward
    for method in ("grft-row", "grft-col", "grft-sparse", "lora"):
        assert rows[method]["flops"] < full
        assert rows[method]["forward_flops"] >= rows["floor"]["forward_flops"]
    # column updates read k inputs: the forward adds exactly out*k MACs per token and layer
    assert rows["grft-col"]["forward_flops"] > rows["floor"]["forward_flops"]
    # the peers add their entries into a dense copy of each weight: its whole [out, in] gradient is computed, as in
    # full fine-tuning; full computes besides only the patch embedding's weight gradient and the input gradient of
    # the first qkv (nothing before it requires grad in the peers)
    batch, patches = TINY["batch_size"], (TINY["img_size"] // 16) ** 2
    patch_weight_gradient = 2 * batch * patches * 192 * 3 * 16 * 16
    first_qkv_input_gradient = 2 * batch * (patches + 1) * 192 * 576
    for peer in ("shira", "supertuning"):
        assert rows[peer]["forward_flops"] == rows["floor"]["forward_flops"]
        assert full - rows[peer]["flops"] == patch_weight_gradient + first_qkv_input_gradient


def test_saved_bytes(rows):
    floor = rows["floor"]["saved_bytes"]
    assert 0 < rows["head"]["saved_bytes"] < floor
    # weight gradients need the layer inputs: full saves more than the frozen backbone
    assert rows["full"]["saved_bytes"] > floor
    assert rows["gps-dense"]["saved_bytes"] == rows["full"]["saved_bytes"]
    # rows need every full input (x @ delta^T), columns only the k chosen input channels
    assert rows["grft-col"]["saved_bytes"] < rows["grft-row"]["saved_bytes"]
    # the peers keep the inputs and the dense weight copies they multiply with (every targeted weight but the first
    # qkv's, whose input needs no gradient): more than full fine-tuning keeps
    weights = 4 * (2 * (192 * 576 + 192 * 192 + 2 * 192 * 768) - 192 * 576)
    for peer in ("shira", "supertuning"):
        assert rows[peer]["saved_bytes"] >= weights
        assert rows[peer]["saved_bytes"] > rows["full"]["saved_bytes"] > rows["grft-sparse"]["saved_bytes"] / 2


def test_files(rows):
    assert rows["floor"]["file_bytes"] is None
    full = rows["full"]["file_bytes"]
    assert full > 4 * rows["full"]["total_params"]  # every parameter in fp32, plus the safetensors header
    assert rows["gps-dense"]["file_bytes"] == full
    for method in ("grft-row", "grft-col", "grft-sparse", "lora", "shira", "supertuning", "head"):
        assert 4 * rows[method]["trainable_params"] <= rows[method]["file_bytes"] < full
    assert rows["gps-dense"]["extra_resident_bytes"] > 0  # the dense bool mask


def test_merged_inference_flops_equal_plain(rows):
    for method in ("grft-row", "grft-col", "grft-sparse"):
        row = rows[method]
        assert row["merged_inference_flops"] == row["plain_inference_flops"]
        assert row["merged_flops_by_op_equal"] and row["merged_is_plain"]


def test_target_checks_cover_figures(rows, checks):
    for name in ("grft-row", "grft-col", "grft-sparse"):
        assert checks[f"grad + Adam moments {name} = 12 B x trainable"]["passed"] is True
        assert checks[f"inference FLOPs after merge_grft ({name}) == plain model"]["passed"] is True
    for name in ("full", "gps-dense"):
        assert checks[f"grad + Adam moments {name} = 12 B x all params"]["passed"] is True
    assert checks["adapter file grft-row (bytes)"]["passed"] is True
    # a timing verdict is the measured ratio against its limit (what the ratio is, on a tiny model, is not asserted)
    for name, limit in (("grft-row", 1.05), ("grft-col", 1.05), ("grft-sparse", 1.15)):
        check = checks[f"step time {name} / floor"]
        assert check["value"] == rows[name]["time_vs_floor"]
        assert check["passed"] == (check["value"] <= limit)
    sparse = checks["saved-for-backward grft-sparse <= grft-row (bytes)"]
    assert sparse["value"] == rows["grft-sparse"]["saved_bytes"] and sparse["passed"] is True


def test_peer_checks_compare_grft_sparse_on_every_figure(rows, checks):
    for peer in ("shira", "supertuning"):
        count = next(check for name, check in checks.items() if name.startswith(f"trainable {peer} = grft-sparse's"))
        assert count["value"] == rows[peer]["trainable_params"] and count["passed"] is True
        for label, key in (("FLOPs", "flops"), ("saved-for-backward bytes", "saved_bytes"),
                           ("file bytes", "file_bytes"), ("step time", "step_time_s")):
            check = checks[f"{label} grft-sparse / {peer}"]
            assert check["value"] == pytest.approx(rows["grft-sparse"][key] / rows[peer][key])
            assert check["passed"] == (check["value"] <= 1.0)
        assert checks[f"gradient + Adam moment bytes grft-sparse / {peer}"]["value"] == pytest.approx(
            rows["grft-sparse"]["trainable_params"] / rows[peer]["trainable_params"])
        assert f"peak memory grft-sparse / {peer}" not in checks  # no peak on the CPU
        # less dense work and fewer saved bytes than a peer that builds the dense weight (any size)
        assert checks[f"FLOPs grft-sparse / {peer}"]["passed"] is True
        assert checks[f"saved-for-backward bytes grft-sparse / {peer}"]["passed"] is True
    for name in ("grft-row", "grft-col"):
        check = checks[f"step time {name} / lora (issue 24)"]
        assert check["value"] == pytest.approx(rows[name]["step_time_s"] / rows["lora"]["step_time_s"])
        assert check["limit"] == "<= 0.85"


def test_markdown_and_script_json(rows, checks, tmp_path):
    table = step_cost.to_markdown(list(rows.values()), list(checks.values()))
    for method in step_cost.METHODS:
        assert f"| {method} |" in table
    assert "| target | measured | limit | result |" in table
    shira = rows["shira"]
    assert (f"- `shira` at r = 1: {shira['trainable_params']:,} trainable against grft-sparse's "
            f"{rows['grft-sparse']['trainable_params']:,}") in table


def test_script_entry_point_writes_json(tmp_path, capsys):
    out = tmp_path / "cost.json"
    md = tmp_path / "cost.md"
    args = step_cost.parse_args([
        "--model", "vit_tiny_patch16_224", "--num-classes", "3", "--img-size", "32", "--batch-size", "2",
        "--model-kwargs", '{"depth": 2}', "--threads", "1", "--repeats", "1", "--warmup", "0",
        "--methods", "floor", "full", "grft-col", "--out", str(out), "--markdown", str(md), "--quiet",
        "--device", "cpu"])
    report = step_cost.run(args)
    data = json.loads(out.read_text())
    assert [row["method"] for row in data["methods"]] == ["floor", "full", "grft-col"]
    assert data["meta"]["model"] == "vit_tiny_patch16_224" and data["targets"] == report["targets"]
    assert "| grft-col |" in md.read_text() and "| grft-col |" in capsys.readouterr().out


def test_a_new_method_is_one_registration():
    """A method registered from outside is a --methods choice and a measured row; a name registers once."""
    benchkit_step = load_benchmark("benchkit.step")

    @step_cost.METHODS.register("test-last-block", description="the last block and the head (test)")
    def setup_last_block(model, context):
        model.requires_grad_(False)
        for module in (model.blocks[-1], model.head):
            module.requires_grad_(True)
        params = [p for p in model.parameters() if p.requires_grad]
        return benchkit_step.Setup(model, torch.optim.Adam(params, lr=context.lr), sum(p.numel() for p in params))

    try:
        assert step_cost.parse_args(["--device", "cpu"]).methods[-1] == "test-last-block"
        rows = step_cost.measure("vit_tiny_patch16_224", **{**TINY, "repeats": 1, "warmup": 0},
                                 methods=["floor", "test-last-block"])
        with pytest.raises(ValueError, match="already registered"):
            step_cost.METHODS.register("test-last-block", description="again")(setup_last_block)
    finally:
        step_cost.METHODS.unregister("test-last-block")
    row = rows[1]
    assert row["method"] == "test-last-block" and row["description"] == "the last block and the head (test)"
    assert row["trainable_params"] == row["requires_grad_params"] == 12 * 192 ** 2 + 13 * 192 + 192 * 5 + 5
    assert row["grad_bytes"] == 4 * row["trainable_params"] and row["file_bytes"] is None
    assert "test-last-block" not in step_cost.METHODS and "test-last-block" not in step_cost.parse_args([]).methods


def test_unknown_method_is_an_error():
    with pytest.raises(ValueError, match="unknown method"):
        step_cost.measure("vit_tiny_patch16_224", methods=["full", "bogus"], **TINY)


def test_cpu_timer_and_threads_are_restored():
    import torch

    before = torch.get_num_threads()
    rows = step_cost.measure("vit_tiny_patch16_224", **{**TINY, "repeats": 1, "warmup": 0},
                             methods=["floor", "grft-col"], timer="cpu")
    assert torch.get_num_threads() == before
    floor = rows[0]
    for row in rows:  # the CPU timer reports the process's CPU time per step
        assert row["timer"] == "cpu" and row["step_time_s"] == row["cpu_time_s"]
        paired = [a / b for a, b in zip(row["step_times_s"], floor["step_times_s"])]
        assert row["time_vs_floor_paired"] == pytest.approx(statistics.median(paired))
    with pytest.raises(ValueError, match="timer"):
        step_cost.measure("vit_tiny_patch16_224", **TINY, methods=["floor"], timer="gpu")


@pytest.mark.slow
def test_compiled_run_times_the_compiled_models(tmp_path):
    """--compile: every method's timed steps run its torch.compile-d model; the figures stay the eager ones."""
    args = step_cost.parse_args([
        "--model", "vit_tiny_patch16_224", "--num-classes", "3", "--img-size", "32", "--batch-size", "2",
        "--model-kwargs", '{"depth": 1}', "--threads", "1", "--repeats", "1", "--warmup", "2", "--quiet",
        "--methods", "floor", "grft-row", "--compile", "--out", str(tmp_path / "c.json")])
    report = step_cost.run(args)
    assert report["meta"]["compiled"] is True
    rows = {row["method"]: row for row in report["methods"]}
    assert rows["grft-row"]["time_vs_floor"] == rows["grft-row"]["step_time_s"] / rows["floor"]["step_time_s"]
    assert rows["grft-row"]["flops_vs_floor"] < 1.05  # counted on the eager model
