"""Selection cost: wall time of GRFT's parameter selection relative to one training epoch on the same data.

Selection (``grft_vision.selection.compute_scores``) runs the SupCon loss forward and a full weight-gradient
backward over the training set (twice per image with two views), plus a no-gradient pass over the whole set
when ``num_subsets > 1``. A GRFT training epoch runs one forward and a backward that computes input
gradients but only the small update gradients. This script times both on the same synthetic data and model,
side by side in one process, and reports their ratio together with the gradient-buffer bytes selection holds.

    python benchmarks/selection_cost.py --model vit_base_patch16_224 --img-size 224 --images 32 \
        --batch-size 16 --repeats 3 --out /tmp/bench/selection_cost.json
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import timm
import torch
from torch import nn
from torch.utils.data import DataLoader

from grft_vision import GRFTConfig, apply_grft
from grft_vision.tuner.targets import find_target_layers
from grft_vision.data import SyntheticImageDataset, TwoViews, contrastive_transform, create_transforms
from grft_vision.tuner.regularization import L2ToPretrained
from grft_vision.selection import compute_scores
from grft_vision.training import TrainStep, train_one_epoch

SETTINGS = {  # name -> (views per image, subsets)
    "select 2 views": (2, 1),
    "select 1 view": (1, 1),
    "select 2 views, 4 subsets": (2, 4),
}


def _loaders(model: nn.Module, images: int, image_size: int, batch_size: int, classes: int):
    data_config = {"input_size": (3, image_size, image_size), "mean": (0.5,) * 3, "std": (0.5,) * 3}
    plain = SyntheticImageDataset(num_classes=classes, num_samples=images, image_size=32, seed=0,
                                  transform=create_transforms(data_config, "vtab", train=True))
    augment = contrastive_transform(data_config)
    one_view = SyntheticImageDataset(num_classes=classes, num_samples=images, image_size=32, seed=0, transform=augment)
    two_views = SyntheticImageDataset(num_classes=classes, num_samples=images, image_size=32, seed=0,
                                      transform=TwoViews(augment))
    loader = lambda dataset: DataLoader(dataset, batch_size=batch_size, shuffle=False)  # noqa: E731
    return loader(plain), {1: loader(one_view), 2: loader(two_views)}


def _time_selection(model: nn.Module, loader: DataLoader, views: int, subsets: int) -> tuple[float, int]:
    config = GRFTConfig(selection_views=views, num_subsets=subsets)
    start = time.perf_counter()
    result = compute_scores(model, loader, config, progress=False)
    seconds = time.perf_counter() - start
    return seconds, sum(score.numel() * score.element_size() for score in result.scores.values())


def _time_epoch(model: nn.Module, loader: DataLoader) -> float:
    wrapped = copy.deepcopy(model)
    scores = {f"{n}.weight": torch.rand(m.weight.shape) for n, m in find_target_layers(wrapped, GRFTConfig()).items()}
    apply_grft(wrapped, scores, GRFTConfig(structure="row", k=1, reg_lambda=1e-6))
    optimizer = torch.optim.Adam([p for p in wrapped.parameters() if p.requires_grad], lr=1e-3)
    step = TrainStep(wrapped, optimizer, nn.CrossEntropyLoss(),
                     regularizer=L2ToPretrained(wrapped, wrapped.grft_state.config))
    start = time.perf_counter()
    train_one_epoch(step, loader, epoch=0, progress=False)
    return time.perf_counter() - start


def measure(model_name: str, image_size: int, images: int, batch_size: int, repeats: int,
            classes: int = 10) -> dict:
    """Median seconds of each selection setting and of one GRFT epoch, and their ratios."""
    torch.manual_seed(0)
    options = {"img_size": image_size} if "vit" in model_name else {}
    model = timm.create_model(model_name, pretrained=False, num_classes=classes, **options)
    epoch_loader, selection_loaders = _loaders(model, images, image_size, batch_size, classes)
    _time_epoch(model, epoch_loader)  # warm-up (allocator, kernels)
    times: dict[str, list[float]] = {name: [] for name in ["epoch", *SETTINGS]}
    gradient_bytes = 0
    for _ in range(repeats):  # interleaved, so drift hits every setting alike
        times["epoch"].append(_time_epoch(model, epoch_loader))
        for name, (views, subsets) in SETTINGS.items():
            seconds, gradient_bytes = _time_selection(model, selection_loaders[views], views, subsets)
            times[name].append(seconds)
    medians = {name: statistics.median(values) for name, values in times.items()}
    targeted = find_target_layers(model, GRFTConfig())
    return {
        "model": model_name, "image_size": image_size, "images": images, "batch_size": batch_size,
        "repeats": repeats, "threads": torch.get_num_threads(), "seconds": medians,
        "ratio_to_epoch": {name: medians[name] / medians["epoch"] for name in SETTINGS},
        "gradient_buffer_bytes": gradient_bytes,
        "targeted_weight_bytes": sum(m.weight.numel() * 4 for m in targeted.values()),
    }


def to_markdown(result: dict) -> str:
    lines = [f"model `{result['model']}` at {result['image_size']} px, {result['images']} images, batch "
             f"{result['batch_size']}, median of {result['repeats']}, {result['threads']} threads", "",
             "| work | seconds | ratio to one GRFT epoch |", "|---|---|---|",
             f"| one GRFT training epoch (rows, k=1) | {result['seconds']['epoch']:.2f} | 1.00 |"]
    for name in SETTINGS:
        lines.append(f"| {name} | {result['seconds'][name]:.2f} | {result['ratio_to_epoch'][name]:.2f} |")
    lines += ["", f"gradient buffers held by selection: {result['gradient_buffer_bytes']:,} bytes "
                  f"(targeted weights in fp32: {result['targeted_weight_bytes']:,} bytes)"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="JSON output file")
    args = parser.parse_args()
    result = measure(args.model, args.img_size, args.images, args.batch_size, args.repeats)
    print(to_markdown(result))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
