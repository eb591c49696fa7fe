"""setup.cfg's requirements are true: every import is declared, the lower bounds cover what the code uses.

What can be checked without installing old releases: the imports of the source (AST), the installed
versions against the bounds, and a table of the APIs that set each bound — each must still be used, and
the bound must be at least the release that introduced it.
"""
from __future__ import annotations

import ast
import configparser
import functools
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "grft_vision"

# (distribution, the release that introduced it, a regular expression finding its use in grft_vision/)
LOWER_BOUND_REASONS = [
    ("torch", "2.3", r"from torch\.nn\.attention import .*sdpa_kernel"),
    ("timm", "1.0.10", r"NativeScaler\(self\.device\.type\)"),  # timm's loss scaler takes the device
    ("torch", "2.0", r"torch\.func\.functional_call"),
    ("torchvision", "0.16", r"from torchvision\.transforms import v2"),
    ("timm", "1.0.12", r"create_scheduler_v2\("),  # returns the epochs with the warm-up prefix (below)
    ("timm", "0.9", r"from timm\.layers"),
    ("transformers", "4.56", r"from_(?:pretrained|config)\([^)]*\bdtype="),
    ("tqdm", "4.30", r"from tqdm\.auto import"),
    ("pyyaml", "5.1", r"safe_dump\([^)]*sort_keys="),
    ("numpy", "1.17", r"np\.random\.default_rng"),
]


def _requirements() -> tuple[dict[str, Requirement], dict[str, dict[str, Requirement]]]:
    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg")

    def parse(text: str) -> dict[str, Requirement]:
        found = (Requirement(line) for line in text.splitlines() if line.strip())
        return {canonicalize_name(requirement.name): requirement for requirement in found}

    extras = {name: parse(text) for name, text in parser["options.extras_require"].items()}
    return parse(parser["options"]["install_requires"]), extras


CORE, EXTRAS = _requirements()


def lower_bound(distribution: str) -> Version:
    requirement = CORE.get(distribution) or next(e[distribution] for e in EXTRAS.values() if distribution in e)
    bounds = [Version(spec.version) for spec in requirement.specifier if spec.operator in (">=", "==")]
    assert bounds, f"{distribution} has no lower bound in setup.cfg"
    return max(bounds)


def _imports(path: Path) -> list[tuple[str, bool]]:
    """``(top-level module, imported at module level?)`` of every absolute import in a file (TYPE_CHECKING
    blocks skipped)."""
    found = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                found.extend((alias.name.partition(".")[0], top) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0:
                found.append((child.module.partition(".")[0], top))
            visit(child, top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

    visit(ast.parse(path.read_text()), True)
    return found


@functools.cache
def _providers() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def _third_party(module: str) -> str | None:
    """The distribution providing a top-level module; None for the standard library and grft_vision."""
    if module in sys.stdlib_module_names or module == "grft_vision":
        return None
    distributions = _providers().get(module)
    assert distributions, f"{module} is imported but no installed distribution provides it"
    return canonicalize_name(distributions[0])


def test_every_import_is_declared_and_module_level_ones_are_core():
    optional = set().union(*EXTRAS.values())
    for path in sorted(PACKAGE.rglob("*.py")):
        for module, module_level in _imports(path):
            distribution = _third_party(module)
            if distribution is None:
                continue
            where = f"{path.relative_to(REPO)} imports {module}"
            if module_level:  # imported by `import grft_vision...`: must come with `pip install grft-vision`
                assert distribution in CORE, f"{where} at module level, but {distribution} is not in install_requires"
            else:
                assert distribution in CORE or distribution in optional, f"{where}; setup.cfg lacks {distribution}"


@pytest.mark.parametrize("distribution, requirement", [*CORE.items(), *EXTRAS["test"].items()])
def test_installed_versions_meet_the_lower_bounds(distribution, requirement):
    try:
        installed = importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{distribution} is not installed")
    assert requirement.specifier.contains(installed, prereleases=True), f"{distribution} {installed} vs {requirement}"


@pytest.mark.parametrize("distribution, introduced, pattern", LOWER_BOUND_REASONS)
def test_lower_bounds_cover_the_apis_the_code_uses(distribution, introduced, pattern):
    sources = "\n".join(path.read_text() for path in PACKAGE.rglob("*.py"))
    assert re.search(pattern, sources), f"no use of {pattern!r} left: drop this reason, maybe lower the bound"
    assert lower_bound(distribution) >= Version(introduced), f"{pattern!r} needs {distribution} >= {introduced}"


def test_timm_counts_the_warmup_prefix_in_the_epochs():
    """Why timm >= 1.0.12: the runner trains the epochs create_scheduler_v2 returns; older releases leave the
    warm-up prefix out, and a run trained warmup_epochs epochs fewer than its settings."""
    from timm.scheduler import create_scheduler_v2

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    _, epochs = create_scheduler_v2(optimizer, num_epochs=3, warmup_epochs=2, warmup_prefix=True)
    assert epochs == 5


def _torch_load_calls_without_weights_only(folder: Path) -> list[str]:
    found = []
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load"
                    and "weights_only" not in {keyword.arg for keyword in node.keywords}):
                found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    return found


@pytest.mark.parametrize("folder", ["grft_vision", "benchmarks"])
def test_torch_load_says_weights_only(folder):
    """torch.load's default changed in torch 2.6 (weights_only=True); with a lower bound of 2.3, say it."""
    assert _torch_load_calls_without_weights_only(REPO / folder) == []
