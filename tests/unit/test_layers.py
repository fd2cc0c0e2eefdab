"""The package layers (README "Layers"): a package imports only those below it.

launch/                      everything below
sidecars/                    engine, checkpoint_engine.contracts
engine/                      checkpoint_engine.contracts
checkpoint_engine/           checkpoint_engine (the shim itself)
checkpoint_engine/contracts/ nothing else of the project
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROJECT = ("launch", "sidecars", "engine", "checkpoint_engine")
# The most specific prefix of a module decides; each may import modules under these prefixes.
ALLOWED = {
    "checkpoint_engine.contracts": ("checkpoint_engine.contracts",),
    "checkpoint_engine": ("checkpoint_engine",),
    "engine": ("engine", "checkpoint_engine.contracts"),
    "sidecars": ("sidecars", "engine", "checkpoint_engine.contracts"),
    "launch": PROJECT,
}


def layer_of(module: str) -> str:
    return max((p for p in ALLOWED if module == p or module.startswith(p + ".")), key=len)


def project_imports(source: str) -> list[str]:
    """Every project module `source` imports, at the top or inside a function."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
    return [m for m in found if m.split(".")[0] in PROJECT]


def violations(module: str, source: str) -> list[str]:
    allowed = ALLOWED[layer_of(module)]
    return [
        f"{module} imports {target}"
        for target in project_imports(source)
        if not any(target == a or target.startswith(a + ".") for a in allowed)
    ]


def _modules() -> list[tuple[str, Path]]:
    out = []
    for pkg in PROJECT:
        for path in sorted((REPO / pkg).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            out.append((".".join(p for p in parts if p != "__init__"), path))
    return out


@pytest.mark.parametrize(("module", "path"), _modules(), ids=[m for m, _ in _modules()])
def test_imports_follow_the_layers(module: str, path: Path) -> None:
    assert violations(module, path.read_text()) == []


@pytest.mark.parametrize(
    ("module", "source", "bad"),
    [
        ("checkpoint_engine.contracts.phases", "from checkpoint_engine.node_engine import X", True),
        ("checkpoint_engine.coordinator", "from launch.etcd_server import connect", True),
        ("checkpoint_engine.vllm_process", "def f():\n    from sidecars.vllm import zygote", True),
        ("engine.controller", "import sidecars.vllm.zygote", True),
        ("engine.controller", "from checkpoint_engine.node_engine import NodeEngine", True),
        ("sidecars.vllm.zygote", "from checkpoint_engine.weight_store import WeightStore", True),
        ("sidecars.vllm.zygote", "from checkpoint_engine.contracts.vllm_protocol import Health", False),
        ("launch.train", "from sidecars.megatron.config import RankConfig", False),
    ],
)
def test_a_backward_import_is_caught(module: str, source: str, bad: bool) -> None:
    assert bool(violations(module, source)) is bad
