"""What an installed grft-vision offers: the light import, errors that name the extra, console scripts, configs.

The light-import checks run a child interpreter in which the optional packages cannot be imported (they
are ``None`` in ``sys.modules``), as on a machine with only torch, timm and safetensors installed.
"""
from __future__ import annotations

import ast
import configparser
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from packaging.requirements import Requirement

from grft_vision.extras import OPTIONAL

REPO = Path(__file__).resolve().parents[1]
# every optional package, and what they would bring along
HIDDEN = (*OPTIONAL, "tensorflow", "peft", "matplotlib", "pandas", "pyarrow")
# None in sys.modules makes ``import X`` raise ModuleNotFoundError and importlib.util.find_spec return None
BLOCKER = f"""
import sys
HIDDEN = {HIDDEN!r}
sys.modules.update(dict.fromkeys(HIDDEN))
"""


def run_hidden(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run ``code`` in a child interpreter that cannot import the optional packages; the source tree first."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", BLOCKER + textwrap.dedent(code)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def setup_cfg() -> configparser.ConfigParser:
    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg")
    return parser


def requirements(section: str, key: str) -> dict[str, Requirement]:
    lines = [line for line in setup_cfg()[section][key].splitlines() if line.strip()]
    return {Requirement(line).name: Requirement(line) for line in lines}


def test_apply_grft_with_scores_needs_only_torch_timm_safetensors(tmp_path):
    done = run_hidden("""
        import json, sys
        import grft_vision
        grft_vision.apply_grft
        import timm, torch
        from grft_vision import GRFTConfig, apply_grft, load_adapter, merge_grft, save_adapter

        def tiny():
            torch.manual_seed(0)
            return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32, depth=2)

        model = tiny()
        scores = {f"{n}.weight": torch.rand(m.weight.shape) for n, m in model.named_modules()
                  if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
        apply_grft(model, scores=scores, config=GRFTConfig(structure="row", k=1))
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.01)
        save_adapter(model, "adapter.safetensors")
        x = torch.randn(2, 3, 32, 32)
        same = torch.allclose(load_adapter(tiny(), "adapter.safetensors").eval()(x), model.eval()(x), atol=1e-5)
        merged = merge_grft(model)(x).shape
        print(json.dumps({"same": same, "shape": list(merged),
                          "hidden_loaded": sorted(m for m, module in sys.modules.items()
                                                 if module is not None and m.partition(".")[0] in HIDDEN)}))
    """, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"same": True, "shape": [2, 3], "hidden_loaded": []}


def test_a_missing_optional_package_is_an_error_naming_its_extra(tmp_path):
    (tmp_path / "flowers").mkdir()
    for name in ("imagelabels.mat", "setid.mat"):
        (tmp_path / "flowers" / name).write_bytes(b"")
    done = run_hidden("""
        import json, torch
        from grft_vision.extras import MissingDependencyError

        def message(call):
            try:
                call()
            except (MissingDependencyError, FileNotFoundError) as error:  # data missing too: one message, both
                return str(error)
            return "no error"

        from grft_vision.data import FgvcOfficialDataset, VtabTfdsDataset
        from grft_vision.llm import glue_metrics, load_tokenizer
        from grft_vision.selection import SupConSelectionLoss
        from grft_vision.training import Monitor

        print(json.dumps({
            "selection": message(SupConSelectionLoss),
            "train": message(lambda: Monitor("tb")),
            "vtab": message(lambda: VtabTfdsDataset("dtd", "test", data_dir="tfds")),
            "fgvc": message(lambda: FgvcOfficialDataset("flowers", "flowers", "train")),
            "llm": message(lambda: glue_metrics("cola", torch.tensor([0, 1]), torch.tensor([0, 1]))),
            "llm-model": message(lambda: load_tokenizer("some/model")),
        }))
    """, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    messages = json.loads(done.stdout.strip().splitlines()[-1])
    for extra, text in messages.items():
        assert f"pip install 'grft-vision[{extra.partition('-')[0]}]'" in text, (extra, text)
    assert "pytorch-metric-learning, which is not installed" in messages["selection"]


def test_the_training_command_without_its_extra_exits_2_naming_it(tmp_path):
    done = run_hidden("""
        import sys
        from grft_vision.commands import train_vtab

        sys.exit(train_vtab(["--dataset", "synthetic", "--img-size", "32", "--epochs", "1", "--warmup-epochs", "0",
                             "--workers", "0", "--quiet", "--set", "synthetic_samples=16", "--run-dir", "run"]))
    """, tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.startswith("error: ") and "pip install 'grft-vision[" in done.stderr


def test_the_extras_install_what_import_optional_asks_for():
    extras = {extra: requirements("options.extras_require", extra) for extra in setup_cfg()["options.extras_require"]}
    for module, (distribution, extra) in OPTIONAL.items():
        assert distribution in extras[extra], f"{module}: extra {extra!r} does not install {distribution}"
        assert distribution in extras["test"], f"the test extra does not install {distribution}"
    assert {"pytorch-metric-learning", "tensorboard"} <= set(extras["train"])


def test_console_scripts_are_the_top_level_scripts():
    entry_points = setup_cfg()["options.entry_points"]["console_scripts"]
    commands = dict(line.replace(" ", "").split("=") for line in entry_points.splitlines() if line.strip())
    assert set(commands) == {"grft-train-vtab", "grft-train-fgvc", "grft-train-glue"}
    for command, target in commands.items():
        module, _, function = target.partition(":")
        assert module == "grft_vision.commands" and function == command.removeprefix("grft-").replace("-", "_")
        script = ast.parse((REPO / f"{function}.py").read_text())
        imported = [(node.module, alias.name) for node in ast.walk(script) if isinstance(node, ast.ImportFrom)
                    for alias in node.names]
        assert imported == [("grft_vision.commands", function)], f"{function}.py must only call {target}"


def test_configs_ship_as_package_data():
    patterns = setup_cfg()["options.package_data"]["grft_vision"].split()
    configs = REPO / "grft_vision"
    shipped = {path for pattern in patterns for path in configs.glob(pattern)}
    assert shipped == set((configs / "configs").rglob("*.yaml")) and len(shipped) > 20
