"""PEFT's sparse peers of ``grft-sparse``, set up at its trainable count, and the checks that compare them.

- **SHiRA** (``peft.ShiraConfig``, ``mask_type="random"``): every targeted ``nn.Linear`` trains ``r (in + out)``
  entries at random positions (one integer ``r`` for every layer, LoRA's count at the same rank).
- **Super-Tuning** (``peft.SupertuningConfig``, pure "Super" mode, ``r=None``): every targeted ``nn.Linear`` trains
  its ``int(in * out * (1 - sparsity))`` largest-magnitude entries (one ``sparsity`` for every layer).

How they compute (PEFT's ``shira/layer.py`` and ``supertuning/layer.py``): in every forward each adapted layer
builds a dense copy of its frozen weight with the trained values added at their positions (SHiRA:
``weight.clone() + sparse_coo_tensor(indices, values)``; Super-Tuning: ``weight.flatten().scatter_add(indices,
values)``) and calls ``F.linear`` with that copy. Autograd therefore keeps the copy and the layer's input for the
backward and computes the copy's dense ``[out, in]`` gradient (one weight-gradient GEMM per layer, as full
fine-tuning does) before picking the trained entries out of it.

Matching the count: a peer's trainable count is its entries in the targeted linears plus the tensors it trains
whole (``modules_to_save``: the classifier head). Neither can hit an arbitrary count exactly: SHiRA's moves in
steps of ``sum(in + out)`` (one ``r``), Super-Tuning's by up to the number of targeted layers at once (every layer
rounds down). :func:`shira_rank` and :func:`supertuning_sparsity` choose the value nearest the target; the row
records the target and the step (``count_target``, ``count_step``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from torch import nn

from .report import check

__all__ = ["PEERS", "shira_count", "shira_rank", "supertuning_count", "supertuning_sparsity", "peft_peer",
           "peft_save", "peer_checks", "peer_counts_markdown"]

PEERS = ("shira", "supertuning")


# --------------------------------------------------------------------------------------------- counts
def shira_count(layers: Sequence[nn.Linear], r: int) -> int:
    """SHiRA's trained entries in ``layers`` at rank ``r``: ``r (in + out)`` per layer (PEFT's ``update_layer``)."""
    return sum(r * (layer.in_features + layer.out_features) for layer in layers)


def shira_rank(layers: Sequence[nn.Linear], budget: int) -> int:
    """The rank whose SHiRA count in ``layers`` is nearest ``budget``: at least 1, at most the largest PEFT allows
    (``r (in + out) <= in * out`` in every layer)."""
    per_rank = shira_count(layers, 1)
    largest = min(layer.in_features * layer.out_features // (layer.in_features + layer.out_features)
                  for layer in layers)
    exact = budget / per_rank
    candidates = {min(largest, max(1, r)) for r in (int(exact), int(exact) + 1)}
    return min(sorted(candidates), key=lambda r: abs(shira_count(layers, r) - budget))


def supertuning_count(layers: Sequence[nn.Linear], sparsity: float) -> int:
    """Super-Tuning's trained entries in ``layers``: ``int(numel * (1 - sparsity))`` per layer, PEFT's formula
    (``SupertuningLayer._num_trainable``)."""
    return sum(int(layer.weight.numel() * (1 - sparsity)) for layer in layers)


def supertuning_sparsity(layers: Sequence[nn.Linear], budget: int) -> float:
    """The sparsity whose Super-Tuning count in ``layers`` is nearest ``budget`` with at least one entry in every
    layer (PEFT refuses a layer without one).

    The count falls in steps as the sparsity grows (each layer rounds down on its own); bisection finds the step
    that crosses ``budget`` (or the largest sparsity that leaves every layer an entry) and the nearer side of it
    is taken.
    """
    if budget >= sum(layer.weight.numel() for layer in layers):
        return 0.0
    smallest = min(layer.weight.numel() for layer in layers)

    def keeps_one(sparsity: float) -> bool:
        return int(smallest * (1 - sparsity)) >= 1

    low, high = 0.0, 1.0  # reaches(low) holds, reaches(high) does not
    for _ in range(200):
        middle = (low + high) / 2
        if middle in (low, high):
            break
        if keeps_one(middle) and supertuning_count(layers, middle) >= budget:
            low = middle
        else:
            high = middle
    candidates = [low] + ([high] if keeps_one(high) else [])
    return min(candidates, key=lambda s: (abs(supertuning_count(layers, s) - budget), s))


# --------------------------------------------------------------------------------------------- setup
def peft_save(model: nn.Module) -> Callable[[Path], list[Path]]:
    """A ``Setup.save`` for a PEFT model: ``save_pretrained`` into the folder; what loading needs counts (the weights
    and the config; the generated README.md model card is left out)."""

    def save(path: Path) -> list[Path]:
        model.save_pretrained(str(path))
        return [path / "adapter_model.safetensors", path / "adapter_config.json"]

    return save


def peft_peer(model: nn.Module, peer: str, targets: Sequence[str], count: int,
              modules_to_save: Sequence[str] | None = None, seed: int = 0) -> tuple[nn.Module, dict[str, Any]]:
    """``get_peft_model(model, <SHiRA or Super-Tuning config>)`` on the ``nn.Linear`` modules named ``targets``, with
    ``modules_to_save`` trained whole, at the trainable count nearest ``count``.

    Returns the PEFT model and the figures of the match: ``count_target`` (``count``), ``count_step`` (how far
    apart the counts the peer can reach are, at most), the chosen ``shira_r`` or ``supertuning_sparsity``, and
    ``shira_index_bytes`` (SHiRA keeps its positions in a plain dict, not as buffers: resident besides the model's
    tensors).
    """
    try:
        from peft import ShiraConfig, SupertuningConfig, get_peft_model
    except ImportError as error:  # Super-Tuning came with peft 0.22
        raise ImportError(f"{peer} needs peft >= 0.22 (pip install -e '.[bench]'): {error}") from error

    layers = [model.get_submodule(name) for name in targets]
    if not layers or not all(isinstance(layer, nn.Linear) for layer in layers):
        raise ValueError(f"{peer} adapts nn.Linear modules only; targets: {list(targets)}")
    whole = sum(p.numel() for name in modules_to_save or () for p in model.get_submodule(name).parameters())
    budget = count - whole  # what the adapted linears must hold
    saved = list(modules_to_save) if modules_to_save else None
    if peer == "shira":
        r = shira_rank(layers, budget)
        config = ShiraConfig(r=r, mask_type="random", random_seed=seed, target_modules=list(targets),
                             modules_to_save=saved)
        details: dict[str, Any] = {"shira_r": r, "count_step": shira_count(layers, 1)}
    elif peer == "supertuning":
        sparsity = supertuning_sparsity(layers, budget)
        config = SupertuningConfig(sparsity=sparsity, select_top=True, r=None, target_modules=list(targets),
                                   modules_to_save=saved)
        details = {"supertuning_sparsity": sparsity, "count_step": len(layers)}
    else:
        raise ValueError(f"unknown peer {peer!r}; choose from {', '.join(PEERS)}")
    model = get_peft_model(model, config)
    details["count_target"] = count
    details["shira_index_bytes"] = sum(indices.numel() * indices.element_size() for module in model.modules()
                                       for indices in (getattr(module, "shira_indices", None) or {}).values())
    return model, details


# --------------------------------------------------------------------------------------------- checks
def _adam_bytes(row: Mapping[str, Any]) -> int:
    """Gradient + Adam moments (Adam's scalar ``step`` tensors left out: 4 B per tensor, not per parameter)."""
    return row["grad_bytes"] + row["optimizer_state_bytes"] - row["optimizer_step_scalar_bytes"]


_FIGURES: tuple[tuple[str, Callable[[Mapping[str, Any]], Any]], ...] = (
    ("FLOPs", lambda row: row.get("flops")),
    ("saved-for-backward bytes", lambda row: row.get("saved_bytes")),
    ("gradient + Adam moment bytes", _adam_bytes),
    ("file bytes", lambda row: row.get("file_bytes")),
    ("step time", lambda row: row.get("step_time_s")),
    ("peak memory", lambda row: row.get("peak_memory_bytes")),
)


def peer_checks(by: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Issue 24's targets on the rows of one run (by method name), those whose methods and figures were measured:

    - each peer's trainable count is ``grft-sparse``'s, to within half of the peer's ``count_step``;
    - ``grft-sparse`` at or below each peer on every figure (FLOPs, saved bytes, gradient + Adam bytes, file
      bytes, step time, peak memory): the ratio ``grft-sparse / peer``, limit 1;
    - rows and columns at most 0.85 x LoRA's step time.
    """
    checks: list[dict[str, Any]] = []
    sparse = by.get("grft-sparse")
    for peer in PEERS:
        row = by.get(peer)
        if row is None or sparse is None:
            continue
        target, step = row.get("count_target"), row.get("count_step")
        if target is not None and step is not None:
            value = row["trainable_params"]
            checks.append(check(f"trainable {peer} = grft-sparse's ({target:,}), to within half a step of {step:,}",
                                value, f"|{value:,} - {target:,}| <= {step / 2:,.0f}",
                                abs(value - target) <= step / 2 and target == sparse["trainable_params"]))
        for label, figure in _FIGURES:
            mine, theirs = figure(sparse), figure(row)
            if mine is None or theirs is None or not theirs:
                continue
            ratio = mine / theirs
            checks.append(check(f"{label} grft-sparse / {peer}", ratio, "<= 1.00", ratio <= 1.0))
    lora = by.get("lora")
    for name in ("grft-row", "grft-col"):
        row = by.get(name)
        if row is None or lora is None or row.get("step_time_s") is None or not lora.get("step_time_s"):
            continue
        ratio = row["step_time_s"] / lora["step_time_s"]
        checks.append(check(f"step time {name} / lora (issue 24)", ratio, "<= 0.85", ratio <= 0.85))
    return checks


def peer_counts_markdown(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """One markdown line per peer of the table: its setting and its trainable count against grft-sparse's."""
    lines = []
    for row in rows:
        if row.get("count_target") is None:
            continue
        setting = (f"r = {row['shira_r']}" if row.get("shira_r") is not None
                   else f"sparsity = {row['supertuning_sparsity']:.6f}")
        lines.append(f"- `{row['method']}` at {setting}: {row['trainable_params']:,} trainable against grft-sparse's "
                     f"{row['count_target']:,} ({row['trainable_params'] / row['count_target']:.3f} ×; its count "
                     f"moves in steps of up to {row['count_step']:,})")
    return ["", "Peers at grft-sparse's trainable count:", ""] + lines if lines else []
