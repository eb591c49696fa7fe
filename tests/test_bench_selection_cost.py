"""The selection-cost benchmark runs and reports consistent figures (not speeds) on a tiny ViT."""
from conftest import load_benchmark

selection_cost = load_benchmark("selection_cost")


def test_selection_cost_figures_on_a_tiny_vit():
    # batch 12 > 10 classes: every batch holds a positive pair
    result = selection_cost.measure("vit_tiny_patch16_224", image_size=32, images=24, batch_size=12, repeats=1)
    # selection holds exactly one fp32 buffer per targeted weight (the scores are squared in place)
    assert result["gradient_buffer_bytes"] == result["targeted_weight_bytes"] > 0
    assert set(result["ratio_to_epoch"]) == set(selection_cost.SETTINGS)
    for name, ratio in result["ratio_to_epoch"].items():  # the ratios are of the reported medians (no speed asserted)
        assert ratio == result["seconds"][name] / result["seconds"]["epoch"]
    assert "| select 2 views |" in selection_cost.to_markdown(result)
