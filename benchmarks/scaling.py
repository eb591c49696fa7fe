"""How the step cost of GRFT grows with the work: step time and saved-for-backward bytes of rows, columns and
sparse entries over the frozen ``floor``, as k grows, as the model grows and as the batch grows.

Sweeps (methods ``floor``, ``grft-row``, ``grft-col``, ``grft-sparse`` in every configuration):

- ``k``: k = 1, 4, 16, 64 rows / columns / entries per row of every weight (ViT-B/16, batch 8, 224 px; the patch
  embedding's columns are its 3 input channels, so columns with k > 3 take all three: ``--clamp-k``);
- ``model``: ViT-S/16, ViT-B/16, ViT-L/16 at batch 8, k = 1;
- ``batch``: ViT-B/16 at batch 2, 8, 32, k = 1;
- ``llm``: the Llama of ``llm_step_cost.py`` (12 layers, batch 4 x 256 tokens) at hidden width 768 (its
  ``cpu-100m`` preset) and 1536, k matched to LoRA r=8's count as in that script.

Every configuration is one run of ``step_cost.py`` or ``llm_step_cost.py`` (their ``run``, in this process; the
figures and conventions are theirs, ``docs/benchmarks.md``), written to ``<out-dir>/configs/<id>.json`` and
``.md`` as soon as it finishes. A configuration whose file is there with the same settings is not measured again,
so an interrupted sweep continues where it stopped (run the same command again), and a configuration can also
be produced elsewhere with the command ``--dry-run`` prints for it. At the end (and with ``--report-only``)
the sweeps are gathered into ``scaling.json``, ``scaling.md`` and ``scaling.png`` (step time x floor and saved
bytes x floor against the swept quantity).

    python benchmarks/scaling.py --out-dir runs/scaling                  # the full sweep
    python benchmarks/scaling.py --reduced --out-dir runs/scaling-small  # batch 4, fewer rounds, Llama 384 / 768
    python benchmarks/scaling.py --tiny --out-dir /tmp/scaling           # tiny models in seconds (a check)
    python benchmarks/scaling.py --dry-run [--reduced | --tiny]          # the commands of every configuration

Every sweep value is a flag (``--ks``, ``--models``, ``--batch-sizes``, ``--llm-widths``, ...); ``--sweeps``
picks sweeps. Needs ``pip install -e ".[bench,llm]"`` (matplotlib for the plot).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import io
import json
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

import llm_step_cost
import step_cost
from benchkit.compare import TIMERS
from benchkit.memory import MB
from benchkit.report import fmt, fmt_ratio, markdown_table, progress_logger

__all__ = ["METHODS", "SWEEPS", "PRESETS", "Point", "plan", "measure_point", "gather", "to_markdown", "plot",
           "parse_args", "main"]

METHODS = ("floor", "grft-row", "grft-col", "grft-sparse")
SWEEPS = ("k", "model", "batch", "llm")
SWEPT = {"k": "k (per weight)", "model": "model", "batch": "batch size", "llm": "hidden width"}
HERE = Path(__file__).resolve().parent

# every setting of a sweep; --reduced and --tiny replace some, a flag given replaces any
PRESETS: dict[str, dict[str, Any]] = {
    "full": dict(base_model="vit_base_patch16_224", models=["vit_small_patch16_224", "vit_base_patch16_224",
                                                            "vit_large_patch16_224"],
                 model_kwargs=None, img_size=224, num_classes=47, ks=[1, 4, 16, 64], base_batch=8,
                 batch_sizes=[2, 8, 32], llm_widths=[768, 1536], llm_layers=12, llm_head_dim=64, llm_mlp_multiple=256,
                 llm_vocab=32000, llm_batch=4, llm_seq_len=256, repeats=5, warmup=2, threads=None),
    # about 25 minutes on 2 CPU cores: half the images per step, fewer rounds, a narrower second Llama
    "reduced": dict(base_batch=4, batch_sizes=[1, 4, 16], llm_widths=[384, 768], repeats=3, warmup=1),
    # seconds: one-block models at 32 px, a one-layer Llama (tests/test_bench_scaling.py)
    "tiny": dict(base_model="vit_tiny_patch16_224", models=["vit_tiny_patch16_224", "vit_small_patch16_224"],
                 model_kwargs={"depth": 1}, img_size=32, num_classes=5, ks=[1, 4], base_batch=2, batch_sizes=[1, 2],
                 llm_widths=[32, 64], llm_layers=1, llm_head_dim=16, llm_mlp_multiple=16, llm_vocab=256, llm_batch=2,
                 llm_seq_len=8,
                 repeats=1, warmup=0, threads=1),
}


# --------------------------------------------------------------------------------------------- the plan
@dataclass
class Point:
    """One configuration: which script measures it with which flags, and the sweeps it belongs to."""

    id: str
    script: str  # "step_cost" or "llm_step_cost"
    flags: list[str]  # the script's flags, without --out / --markdown
    sweeps: list[tuple[str, Any]] = field(default_factory=list)  # (sweep, swept value)

    def argv(self, out_dir: Path) -> list[str]:
        return [*self.flags, "--out", str(self.json_path(out_dir)), "--markdown",
                str(self.json_path(out_dir).with_suffix(".md")), "--quiet"]

    def json_path(self, out_dir: Path) -> Path:
        return out_dir / "configs" / f"{self.id}.json"

    def command(self, out_dir: Path) -> str:
        return shlex.join(["python", str(HERE / f"{self.script}.py"), *self.argv(out_dir)])


def _llm_width_flags(width: int, settings: dict[str, Any]) -> list[str]:
    """The Llama of ``llm_step_cost.py`` at hidden width ``width``: heads of ``llm_head_dim``, the MLP 8/3 as wide
    rounded to a multiple of ``llm_mlp_multiple`` (768 -> 2048: the ``cpu-100m`` preset)."""
    head_dim, multiple = settings["llm_head_dim"], settings["llm_mlp_multiple"]
    if width % head_dim:
        raise ValueError(f"llm width {width} is not a multiple of the head dimension {head_dim}")
    intermediate = max(multiple, round(8 * width / 3 / multiple) * multiple)
    heads = width // head_dim
    return ["--preset", "cpu-100m", "--hidden", str(width), "--layers", str(settings["llm_layers"]), "--heads",
            str(heads), "--kv-heads", str(heads), "--head-dim", str(head_dim), "--intermediate", str(intermediate),
            "--vocab", str(settings["llm_vocab"]), "--batch-size", str(settings["llm_batch"]), "--seq-len",
            str(settings["llm_seq_len"]), "--peak-steps", "0"]


def plan(settings: dict[str, Any], sweeps: Sequence[str] = SWEEPS) -> list[Point]:
    """The configurations of ``sweeps``, each once (ViT-B/16 at batch 8, k = 1 is in three sweeps), in run order."""
    common = ["--methods", *METHODS, "--repeats", str(settings["repeats"]), "--warmup", str(settings["warmup"]),
              "--device", settings["device"], "--timer", settings["timer"]]
    if settings["threads"] is not None:
        common += ["--threads", str(settings["threads"])]
    points: dict[str, Point] = {}

    def vision(sweep: str, value: Any, model: str, batch: int, k: int) -> None:
        flags = ["--model", model, "--img-size", str(settings["img_size"]), "--num-classes",
                 str(settings["num_classes"]), "--batch-size", str(batch), "--k", str(k), "--clamp-k"]
        if settings["model_kwargs"]:
            flags += ["--model-kwargs", json.dumps(settings["model_kwargs"], sort_keys=True)]
        key = f"vision-{model}-{settings['img_size']}px-b{batch}-k{k}"
        points.setdefault(key, Point(key, "step_cost", flags + common)).sweeps.append((sweep, value))

    for sweep in sweeps:
        if sweep == "k":
            for k in settings["ks"]:
                vision(sweep, k, settings["base_model"], settings["base_batch"], k)
        elif sweep == "model":
            for model in settings["models"]:
                vision(sweep, model, model, settings["base_batch"], 1)
        elif sweep == "batch":
            for batch in settings["batch_sizes"]:
                vision(sweep, batch, settings["base_model"], batch, 1)
        elif sweep == "llm":
            for width in settings["llm_widths"]:
                key = (f"llm-h{width}-l{settings['llm_layers']}-b{settings['llm_batch']}"
                       f"x{settings['llm_seq_len']}")
                points.setdefault(key, Point(key, "llm_step_cost", _llm_width_flags(width, settings) + common)
                                  ).sweeps.append((sweep, width))
        else:
            raise ValueError(f"unknown sweep {sweep!r}; choose from {', '.join(SWEEPS)}")
    return list(points.values())


# --------------------------------------------------------------------------------------------- measuring
def _module(point: Point):
    return step_cost if point.script == "step_cost" else llm_step_cost


# what a configuration's file must record to be taken as this configuration's (besides the methods)
_VISION_KEYS = ("model", "model_kwargs", "img_size", "num_classes", "batch_size", "k", "clamp_k", "repeats", "warmup",
                "timer")


def _expected_meta(point: Point, out_dir: Path) -> dict[str, Any]:
    args = _module(point).parse_args(point.argv(out_dir))
    if point.script == "step_cost":
        return {key: getattr(args, key) for key in _VISION_KEYS} | {"device": str(torch.device(args.device))}
    workload = llm_step_cost.workload_from_args(args)
    return {"shape": dataclasses.asdict(workload.shape), "batch_size": workload.batch_size,
            "seq_len": workload.seq_len, "task": workload.task, "dtype": workload.dtype, "repeats": args.repeats,
            "warmup": args.warmup, "timer": args.timer, "device": workload.device}


def load_point(point: Point, out_dir: Path) -> dict[str, Any] | None:
    """The report of ``point`` in ``out_dir`` when it is there, complete, and of the same settings; else None."""
    path = point.json_path(out_dir)
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    meta = report.get("meta", {})
    if [row.get("method") for row in report.get("methods", [])] != list(METHODS):
        return None
    if any(meta.get(key) != value for key, value in _expected_meta(point, out_dir).items()):
        return None
    return report


def measure_point(point: Point, out_dir: Path) -> dict[str, Any]:
    """Run the script of ``point`` in this process (its table goes to the ``.md`` file, not to stdout); its report."""
    module = _module(point)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return module.run(module.parse_args(point.argv(out_dir)))
    finally:
        gc.collect()  # the configuration's models, before the next (larger) one is built


# --------------------------------------------------------------------------------------------- report
_KEPT = ("trainable_params", "k", "flops", "saved_bytes", "step_time_s", "cpu_per_wall", "flops_vs_floor",
         "saved_vs_floor", "time_vs_floor", "time_vs_floor_paired")


def gather(points: list[Point], reports: dict[str, dict[str, Any]], settings: dict[str, Any]) -> dict[str, Any]:
    """The sweeps: for each, its values in order with every method's figures and ratios to ``floor``."""
    sweeps: dict[str, list[dict[str, Any]]] = {}
    for point in points:
        report = reports.get(point.id)
        if report is None:
            continue
        rows = {row["method"]: {key: row.get(key) for key in _KEPT} for row in report["methods"]}
        if point.script == "step_cost":  # the vision rows hold no k: the run's
            for name, row in rows.items():
                row["k"] = None if name == "floor" else report["meta"]["k"]
        for sweep, value in point.sweeps:
            sweeps.setdefault(sweep, []).append({
                "value": value, "config": point.id, "total_params": report["meta"]["total_params"],
                "date": report["meta"]["date"], "device_name": report["meta"]["device_name"],
                "methods": {name: row for name, row in rows.items() if name in METHODS}})
    order = {"k": "ks", "model": "models", "batch": "batch_sizes", "llm": "llm_widths"}  # the flags' order
    for sweep, entries in sweeps.items():
        entries.sort(key=lambda entry: list(settings[order[sweep]]).index(entry["value"]))
    return {"settings": settings, "sweeps": sweeps,
            "configs": {point.id: point.command(Path(settings["out_dir"])) for point in points}}


def _title(sweep: str, settings: dict[str, Any]) -> str:
    size = f"{settings['img_size']} px"
    if sweep == "k":
        return f"as k grows: {settings['base_model']}, batch {settings['base_batch']}, {size}"
    if sweep == "model":
        return f"as the model grows: batch {settings['base_batch']}, k = 1, {size}"
    if sweep == "batch":
        return f"as the batch grows: {settings['base_model']}, k = 1, {size}"
    return (f"as the Llama widens: {settings['llm_layers']} layers, batch {settings['llm_batch']} x "
            f"{settings['llm_seq_len']} tokens, k matched to LoRA r=8's count")


def to_markdown(gathered: dict[str, Any]) -> str:
    """One table per sweep: per value and method, trainable count, k, step time, saved bytes, each x floor."""
    settings = gathered["settings"]
    lines = [f"Step cost as the work grows ({', '.join(METHODS)}); step time = median "
             f"{'process CPU' if settings['timer'] == 'cpu' else 'wall-clock'} seconds of {settings['repeats']} "
             f"steps after {settings['warmup']} warm-up rounds; every ratio is to `floor` in the same run.", ""]
    for sweep, entries in gathered["sweeps"].items():
        lines += [f"### {_title(sweep, settings)}", ""]
        header = [SWEPT[sweep], "params", "method", "trainable", "k", "step s", "time × floor", "saved MB",
                  "saved × floor", "FLOPs × floor"]
        body = []
        for entry in entries:
            for method, row in entry["methods"].items():
                body.append([str(entry["value"]), f"{entry['total_params'] / 1e6:,.1f} M", method,
                             f"{row['trainable_params']:,}", "–" if row.get("k") is None else str(row["k"]),
                             fmt(row["step_time_s"], 3), fmt_ratio(row["time_vs_floor"]),
                             fmt(row["saved_bytes"], 1, MB), fmt_ratio(row["saved_vs_floor"]),
                             fmt_ratio(row["flops_vs_floor"])])
        lines += markdown_table(header, body) + [""]
    return "\n".join(lines)


def plot(gathered: dict[str, Any], path: Path) -> Path:
    """Step time x floor (top) and saved bytes x floor (bottom) against each sweep's value, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweeps = list(gathered["sweeps"].items())
    fig, axes = plt.subplots(2, max(1, len(sweeps)), figsize=(4.2 * max(1, len(sweeps)), 7.2), squeeze=False)
    styles = {"grft-row": ("tab:blue", "o"), "grft-col": ("tab:orange", "s"), "grft-sparse": ("tab:green", "^")}
    for column, (sweep, entries) in enumerate(sweeps):
        categorical = sweep == "model"
        xs = list(range(len(entries))) if categorical else [entry["value"] for entry in entries]
        for row, (key, label) in enumerate((("time_vs_floor", "step time × floor"),
                                            ("saved_vs_floor", "saved for backward × floor"))):
            ax = axes[row][column]
            ax.axhline(1.0, color="tab:gray", linestyle="--", linewidth=1, label="floor")
            for method, (colour, marker) in styles.items():
                points = [(x, entry["methods"][method][key]) for x, entry in zip(xs, entries)
                          if method in entry["methods"] and entry["methods"][method][key] is not None]
                if points:
                    ax.plot(*zip(*points), color=colour, marker=marker, label=method)
            if categorical:
                ax.set_xticks(xs, [str(entry["value"]).replace("_patch16_224", "") for entry in entries])
            else:
                if sweep in ("k", "batch"):
                    ax.set_xscale("log", base=2)
                ax.set_xticks(xs, [str(x) for x in xs])
            ax.set_xlabel(SWEPT[sweep])
            ax.set_ylabel(label)
            if row == 0:
                ax.set_title(_title(sweep, gathered["settings"]).split(":")[0], fontsize=10)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(points: list[Point], out_dir: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Gather every configuration found in ``out_dir`` into scaling.json, scaling.md and scaling.png."""
    reports = {point.id: report for point in points if (report := load_point(point, out_dir)) is not None}
    gathered = gather(points, reports, settings)
    gathered["missing"] = [point.id for point in points if point.id not in reports]
    (out_dir / "scaling.json").write_text(json.dumps(gathered, indent=2) + "\n", encoding="utf-8")
    (out_dir / "scaling.md").write_text(to_markdown(gathered), encoding="utf-8")
    if gathered["sweeps"]:
        plot(gathered, out_dir / "scaling.png")
    return gathered


# --------------------------------------------------------------------------------------------- command line
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out-dir", default="runs/scaling", help="configs/, scaling.json, scaling.md, scaling.png")
    preset = parser.add_mutually_exclusive_group()
    preset.add_argument("--reduced", action="store_true", help="the sweep that fits about 25 minutes on 2 CPU cores")
    preset.add_argument("--tiny", action="store_true", help="tiny models, seconds: a check of the script")
    parser.add_argument("--dry-run", action="store_true", help="print every configuration's command, run nothing")
    parser.add_argument("--report-only", action="store_true", help="gather what out-dir holds, measure nothing")
    parser.add_argument("--sweeps", nargs="+", choices=SWEEPS, default=list(SWEEPS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--timer", choices=TIMERS, default="wall")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    full = PRESETS["full"]
    for name, kind, nargs, help_text in (
            ("base_model", str, None, "the ViT of the k and batch sweeps"),
            ("models", str, "+", "the ViTs of the model sweep"),
            ("model_kwargs", json.loads, None, "extra timm.create_model arguments (JSON) of every ViT"),
            ("img_size", int, None, ""), ("num_classes", int, None, ""),
            ("ks", int, "+", "k of the k sweep"), ("base_batch", int, None, "batch of the k and model sweeps"),
            ("batch_sizes", int, "+", "batches of the batch sweep"),
            ("llm_widths", int, "+", "hidden widths of the Llama sweep"), ("llm_layers", int, None, ""),
            ("llm_head_dim", int, None, ""), ("llm_mlp_multiple", int, None, "the MLP width rounds to it"),
            ("llm_vocab", int, None, ""), ("llm_batch", int, None, ""),
            ("llm_seq_len", int, None, ""), ("repeats", int, None, "timed steps per method"),
            ("warmup", int, None, "untimed rounds"), ("threads", int, None, "torch.set_num_threads")):
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, nargs=nargs, default=None,
                            help=f"{help_text + '; ' if help_text else ''}default {full[name]!r} (--reduced, "
                                 "--tiny: their own)")
    args = parser.parse_args(argv)
    preset_name = "tiny" if args.tiny else "reduced" if args.reduced else "full"
    for name, value in {**full, **PRESETS[preset_name]}.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.tiny and not any(arg.startswith("--device") for arg in (argv if argv is not None else sys.argv[1:])):
        args.device = "cpu"
    args.preset = preset_name
    return args


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in PRESETS["full"]} | {
        "device": args.device, "timer": args.timer, "preset": args.preset, "out_dir": str(args.out_dir)}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    settings = settings_of(args)
    out_dir = Path(args.out_dir)
    points = plan(settings, args.sweeps)
    if args.dry_run:
        for point in points:
            print(point.command(out_dir))
        print(f"# {len(points)} configurations ({', '.join(args.sweeps)} sweeps, preset {args.preset}); results in "
              f"{out_dir}/configs, gathered into {out_dir}/scaling.{{json,md,png}}")
        return 0
    log = progress_logger("scaling", not args.quiet)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        for number, point in enumerate(points, 1):
            if load_point(point, out_dir) is not None:
                log(f"{number}/{len(points)} {point.id}: already measured")
                continue
            log(f"{number}/{len(points)} {point.id}: measuring ({datetime.datetime.now():%H:%M:%S})")
            measure_point(point, out_dir)
    gathered = write_report(points, out_dir, settings)
    print(to_markdown(gathered))
    if gathered["missing"]:
        print(f"scaling.py: not measured yet: {', '.join(gathered['missing'])}", file=sys.stderr)
    log(f"results in {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
