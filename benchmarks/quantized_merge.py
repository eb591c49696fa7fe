"""What merging an adapter into a quantized base costs: the error re-quantization adds.

``merge_adapter`` on a bitsandbytes layer dequantizes the weight, adds the update and quantizes the sum again
with the layer's own settings, so the merged layer carries the format's rounding of the *whole* weight, not only
of the update. This script measures that error on a timm ViT (random weights; the error is a property of the
format and of the update's size, not of training) for each format and update size:

- ``update kept``: ``<merged - quantized base, update>`` / ``||update||²`` over the merged layers — the share of
  the update the merged weights still carry (1 = all of it);
- ``weight error``: ``||merged - (dequantized base + update)|| / ||update||`` — the rounding relative to the
  update itself;
- ``output error``: ``||y_merged - y_adapter|| / ||y_adapter - y_base||`` on random images — how far the merged
  model's logits are from the adapter's, relative to what the adapter changed (computed in bitsandbytes'
  training path, the dequantized weights' matmul, so that int8's activation quantization at inference does not
  mix in).

The update is set (not trained): per targeted weight, its chosen entries get Gaussian values whose rms is
``--update-scale`` times the weight's rms (fine-tuning moves a few weights by about 1 %; the defaults sweep 0.1 %
to 10 %)::

    python benchmarks/quantized_merge.py --markdown docs/results/quantized_merge.md

Needs ``pip install -e ".[bench]"`` (bitsandbytes).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import warnings
from typing import Any, Sequence

import timm
import torch

from grft_vision import GRFTConfig, apply_grft, disable_adapter, merge_adapter, quantize_model
from grft_vision.tuner.layer import grft_layers
from grft_vision.tuner.quantized import QUANT_TYPES, weight_shape

__all__ = ["measure", "to_markdown", "main"]


def _model(name: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)  # train mode (no dropout in these ViTs): bitsandbytes' dequantized-weight matmul
    return timm.create_model(name, pretrained=False, num_classes=10).train()


def _set_update(model: torch.nn.Module, scale: float, seed: int) -> None:
    """Every wrapped quantized layer's update: Gaussian, rms ``scale`` x the layer's dequantized weight rms."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in grft_layers(model):
            rms = layer.pristine_weight().float().pow(2).mean().sqrt()
            layer.delta.copy_(torch.randn(layer.delta.shape, generator=generator) * rms * scale)


def _one(name: str, quant_type: str, scale: float, structure: str, k: int, seed: int) -> dict[str, Any]:
    model = quantize_model(_model(name, seed), quant_type)
    scores = {f"{n}.weight": torch.rand(weight_shape(m), generator=torch.Generator().manual_seed(seed))
              for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and n != "head"}
    apply_grft(model, scores, GRFTConfig(structure=structure, k=k, train_head=False, train_bias=False,
                                         target_modules=["blocks.*"]))
    _set_update(model, scale, seed)
    images = torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(seed + 1))
    layers = dict(grft_layers(model))
    base_weights = {n: layer.pristine_weight().float() for n, layer in layers.items()}
    updates = {n: layer.delta_weight().detach().float() for n, layer in layers.items()}
    with torch.no_grad():
        with disable_adapter(model):
            base = model(images)
        live = model(images)
        merged_model = copy.deepcopy(model)
        merge_adapter(merged_model)
        merged = merged_model(images)
    merged_layers = dict(grft_layers(merged_model))
    kept = error = norm = 0.0
    for n, layer in merged_layers.items():
        merged_weight = layer.quantization.dequantize(layer.base_layer).float()
        change = merged_weight - base_weights[n]
        kept += float((change * updates[n]).sum())
        error += float((merged_weight - base_weights[n] - updates[n]).pow(2).sum())
        norm += float(updates[n].pow(2).sum())
    return {"model": name, "quant_type": quant_type, "update_scale": scale, "structure": structure, "k": k,
            "layers": len(merged_layers), "update_kept": kept / norm, "weight_error": (error / norm) ** 0.5,
            "output_error": float((merged - live).norm() / (live - base).norm())}


def measure(model: str, quant_types: Sequence[str], scales: Sequence[float], structure: str, k: int,
            seed: int) -> list[dict[str, Any]]:
    """One row per format and update scale (see the module docstring)."""
    return [_one(model, quant_type, scale, structure, k, seed) for quant_type in quant_types for scale in scales]


def to_markdown(rows: list[dict[str, Any]]) -> str:
    first = rows[0]
    lines = [f"{first['model']} (random weights), {first['structure']} k={first['k']} in {first['layers']} linear layers "
             "of the blocks; update rms = scale x the weight's rms", "",
             "| format | update scale | update kept | weight error / update | output error / adapter's change |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {row['quant_type']} | {row['update_scale']:g} | {row['update_kept']:.3f} | {row['weight_error']:.2f} | "
              f"{row['output_error']:.3f} |" for row in rows]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--quant-types", nargs="+", choices=QUANT_TYPES, default=list(QUANT_TYPES))
    parser.add_argument("--scales", nargs="+", type=float, default=[0.001, 0.01, 0.1])
    parser.add_argument("--structure", default="column")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="JSON rows")
    parser.add_argument("--markdown", help="the markdown table")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message="MatMul8bitLt")  # bitsandbytes' note on every int8 call
    rows = measure(args.model, args.quant_types, args.scales, args.structure, args.k, args.seed)
    text = to_markdown(rows)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(rows, handle, indent=1)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as handle:
            handle.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
