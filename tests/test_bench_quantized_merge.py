"""benchmarks/quantized_merge.py on a tiny ViT: the figures are what they say (a merge into int8 keeps more of
the update than one into nf4; nothing is lost when the update is large against the format's step)."""
from __future__ import annotations

import pytest

from conftest import load_benchmark

pytest.importorskip("bitsandbytes")
quantized_merge = load_benchmark("quantized_merge")

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_merge_error_falls_with_the_format_step_and_the_update_size():
    rows = quantized_merge.measure("vit_tiny_patch16_224", ["nf4", "int8"], [0.01, 1.0], "column", 2, seed=0)
    by = {(row["quant_type"], row["update_scale"]): row for row in rows}
    assert by["int8", 0.01]["update_kept"] > by["nf4", 0.01]["update_kept"]  # int8's step is finer
    for quant_type in ("nf4", "int8"):  # an update far above the step survives the re-quantization
        assert by[quant_type, 1.0]["update_kept"] > by[quant_type, 0.01]["update_kept"]
        assert by[quant_type, 1.0]["weight_error"] < by[quant_type, 0.01]["weight_error"]
        assert 0.9 < by[quant_type, 1.0]["update_kept"] < 1.1
    assert all(row["layers"] == 48 and row["output_error"] >= 0 for row in rows)
    assert "| nf4 | 0.01 |" in quantized_merge.to_markdown(rows)
