"""The width sweep: the benchmark at several widths and pre-training seeds, one checkpoint each
(:class:`Sweep`, :func:`run_sweep`, :func:`load_sweep`); its statistics are in :mod:`.sweep_statistics`."""
from __future__ import annotations

import dataclasses
import datetime
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .log import line_logger
from .orchestration import run_benchmark
from .plots import plot_sweep
from .provenance import code_version, command_line, machine
from .settings import DEFAULT_REG_LAMBDA, Settings
from .sweep_statistics import SWEEP_METHODS, summarise_sweep, sweep_markdown

__all__ = ["Sweep", "SWEEP_CORE", "SWEEP", "QUICK_SWEEP", "checkpoint_name", "run_sweep", "load_sweep"]


@dataclass(frozen=True)
class Sweep:
    """The width sweep: one benchmark run (:func:`run_benchmark`) per (width, pre-training seed).

    The pre-training learning rate scales as ``1 / width`` from the base settings' (AdamW's rule for hidden
    weights in muP): with the width-64 recipe's 3e-3, a width-192 model stays at chance loss for longer
    than one at 1e-3. The fine-tuning learning rates and lambda are the benchmark's, tuned at width 64.

    Attributes:
        widths: embedding widths; ``num_heads = width / head_dim``, the depth stays the base settings'.
        pretrain_seeds: one pre-trained checkpoint per seed at every width.
        head_dim: width of one attention head (16: the width-64, 4-head model's).
        methods: the fine-tuning methods, :data:`SWEEP_METHODS` by default.
        overrides: :class:`Settings` overrides at every width.
        per_width: :class:`Settings` overrides by width, applied last (fewer source epochs or methods at the
            wider models); a width not listed runs the base settings (with the scaled learning rate).
    """

    widths: tuple[int, ...] = (64, 128, 192)
    pretrain_seeds: tuple[int, ...] = (0, 1)
    head_dim: int = 16
    methods: tuple[str, ...] = SWEEP_METHODS
    overrides: dict[str, Any] = field(default_factory=dict)
    per_width: dict[int, dict[str, Any]] = field(default_factory=dict)

    def settings_at(self, base: Settings, width: int, pretrain_seed: int) -> Settings:
        """The benchmark settings of one checkpoint: ``base`` resized to ``width``, then the overrides."""
        if width <= 0 or width % self.head_dim:
            raise ValueError(f"width {width} is not a positive multiple of the head width {self.head_dim}; "
                             f"pick widths like {self.head_dim * 4}, {self.head_dim * 8}")
        values = {"embed_dim": width, "num_heads": width // self.head_dim, "pretrain_seed": pretrain_seed,
                  "pretrain_lr": base.pretrain_lr * base.embed_dim / width, "methods": self.methods,
                  **self.overrides, **self.per_width.get(width, {})}
        return dataclasses.replace(base, **values)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))  # int keys -> str, tuples -> lists


# About 90 minutes on 2 idle cores (docs/results.md): widths 64 and 128, GRFT / random / lowest rows only. Width
# 128 keeps the 10 source epochs: with 7 it ended at 15.5 % source top-1 against width 64's 35.5 % (the accuracy
# jumps in the last, low-learning-rate epochs), and widths must be compared at a comparable source accuracy.
# Widths 192 and 384 with every method are the GPU command in the module docstring.
SWEEP_CORE = ("grft-row-k1", "random-row-k1", "lowest-row-k1")
SWEEP = Sweep(widths=(64, 128), methods=SWEEP_CORE)
# the pipeline check: two tiny widths, one target, two seeds (two units per checkpoint for an interval)
QUICK_SWEEP = Sweep(widths=(16, 32), overrides={"targets": ("count",), "source_images": 512,
                                                "source_val_images": 128})


def checkpoint_name(width: int, pretrain_seed: int) -> str:
    """The folder of one checkpoint's benchmark run inside the sweep's output folder."""
    return f"width{width}-pretrain{pretrain_seed}"


def _finished(path: Path, settings: Settings) -> dict[str, Any] | None:
    """A checkpoint's earlier ``results.json`` if it ran with exactly these settings (a resumed sweep)."""
    if not path.is_file():
        return None
    results = json.loads(path.read_text())
    return results if results.get("settings") == json.loads(json.dumps(settings.to_dict())) else None


def run_sweep(sweep: Sweep, base: Settings, out_dir: Path, cache_dir: Path | None, workers: int = 2,
              lr: dict[str, float] | None = None, reg_lambda: float = DEFAULT_REG_LAMBDA,
              quiet: bool = False, command: str | None = None) -> dict[str, Any]:
    """Run the benchmark at every (width, pre-training seed) of ``sweep``; write ``sweep.json`` (settings,
    code version, command, summary; the per-job results stay in each checkpoint's ``results.json``),
    ``sweep.md`` and ``width_sweep.png``. A checkpoint whose ``results.json`` already holds the same settings
    is not run again (an interrupted sweep resumes). ``command``: the command line to record."""
    command, code = command or command_line(), code_version()
    out_dir.mkdir(parents=True, exist_ok=True)
    log = line_logger(out_dir / "log.txt", quiet)
    begin = time.perf_counter()
    runs: dict[str, dict[str, Any]] = {}
    resumed: list[str] = []
    for width in sweep.widths:
        for seed in sweep.pretrain_seeds:
            settings, name = sweep.settings_at(base, width, seed), checkpoint_name(width, seed)
            done = _finished(out_dir / name / "results.json", settings)
            if done is not None:
                log(f"{name}: already done ({out_dir / name / 'results.json'}), kept")
                runs[name] = done
                resumed.append(name)
                continue
            log(f"{name}: width {width}, {settings.num_heads} heads, pre-training seed {seed}, "
                f"{settings.pretrain_epochs} source epochs, {len(settings.methods)} methods")
            runs[name] = run_benchmark(settings, out_dir / name, cache_dir, workers, lr, reg_lambda, quiet,
                                       plot_file=None, command=command)
            timing = runs[name]["timing"]
            log(f"{name}: source val top-1 {runs[name]['pretrain']['source_val_top1']:.3f}, "
                f"pre-training {timing['pretrain_seconds']:.0f} s, fine-tuning {timing['finetune_seconds']:.0f} s")
    results = {
        "benchmark": "transfer-width-sweep", "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": command, "code": code, "machine": machine(), "workers": workers,
        "sweep": sweep.to_dict(), "base_settings": base.to_dict(),
        "checkpoints": {name: f"{name}/results.json" for name in runs},
        "timing": _timing(runs, time.perf_counter() - begin, resumed),
    }
    results["summary"] = summarise_sweep(runs)
    (out_dir / "sweep.json").write_text(json.dumps(results, indent=1))
    (out_dir / "sweep.md").write_text(sweep_markdown(results["summary"]))
    plot_sweep(results["summary"], out_dir / "width_sweep.png")
    log(f"sweep done in {results['timing']['total_seconds']:.0f} s: {out_dir / 'sweep.md'}")
    return results


def _timing(runs: dict[str, dict[str, Any]], total_seconds: float, resumed: list[str]) -> dict[str, Any]:
    """The sweep's seconds: in all, pre-training and fine-tuning summed over the checkpoints, per checkpoint, and
    the CPU seconds (pre-trainings made in this sweep, all fine-tuning jobs: what it costs on idle cores)."""
    return {"total_seconds": total_seconds,
            "pretrain_seconds": sum(r["timing"]["pretrain_seconds"] for r in runs.values()),
            "finetune_seconds": sum(r["timing"]["finetune_seconds"] for r in runs.values()),
            "checkpoint_seconds": {n: r["timing"]["total_seconds"] for n, r in runs.items()},
            "cpu_seconds": sum(r["pretrain"].get("cpu_seconds", 0.0) for r in runs.values()
                               if not r["pretrain"]["from_cache"])
            + sum(j.get("cpu_seconds", 0.0) for r in runs.values() for j in r["runs"]),
            "resumed": resumed}


def load_sweep(out_dir: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """``(sweep.json, {checkpoint name: its results.json})`` of a finished sweep folder."""
    results = json.loads((out_dir / "sweep.json").read_text())
    return results, {name: json.loads((out_dir / path).read_text()) for name, path in results["checkpoints"].items()}

