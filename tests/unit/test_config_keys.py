"""Every config key reaches code that reads it: a key nobody reads is a bug, since the user believes
they changed something. Composes every group option, walks each key to the section that defines it,
and looks for a read of that field (`.name`) in the project's code outside the config classes."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from pydantic import BaseModel

from checkpoint_engine.config import EngineConfig
from checkpoint_engine.contracts.config import Section
from launch.config_loading import CONF_DIR, compose
from sidecars.megatron.config import RankConfig

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("checkpoint_engine", "engine", "sidecars", "launch")
OPTIONS = [(g.name, p.stem) for g in sorted(CONF_DIR.iterdir()) if g.is_dir() for p in sorted(g.glob("*.yaml"))]
WORKED = ["task.path=x.jsonl", "rollout.stop=''"]  # worked solutions span lines
NEEDS = {
    "jsonl": ["task.path=x.jsonl"],
    "gsm8k": WORKED,
    "math": WORKED,
    "code": WORKED,
    "32k": ["model.max_positions=32768"],
    "128k": ["model.max_positions=131072"],
}


def _is_validator(node: ast.AST) -> bool:
    """A pydantic validator: reading a field to check it does not make the key used."""
    if not isinstance(node, ast.FunctionDef):
        return False
    names = [d.func if isinstance(d, ast.Call) else d for d in node.decorator_list]
    return any(isinstance(n, ast.Name) and n.id.endswith("_validator") for n in names)


def attribute_reads(sources: list[str]) -> set[str]:
    """Names read as attributes (`x.name`) in `sources`, outside validators."""
    reads: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _is_validator(node):
            return
        if isinstance(node, ast.Attribute):
            reads.add(node.attr)
        for child in ast.iter_child_nodes(node):
            visit(child)

    for source in sources:
        visit(ast.parse(source))
    return reads


def unread_keys(root: type[BaseModel], data: dict, reads: set[str], prefix: str = "") -> list[str]:
    """Keys of `data` (a composed config for `root`) whose field no code reads."""
    missing = []
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        annotation = root.model_fields[name].annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel) and isinstance(value, dict):
            missing += unread_keys(annotation, value, reads, key)
        elif name not in reads:
            missing.append(key)
    return missing


@pytest.fixture(scope="module")
def reads() -> set[str]:
    return attribute_reads([p.read_text() for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")])


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_key_of_every_group_option_is_read(group: str, option: str, reads: set[str]) -> None:
    from omegaconf import OmegaConf

    from launch.train_config import TrainConfig

    composed = OmegaConf.to_container(compose([f"{group}={option}", *NEEDS.get(option, [])]), resolve=True)
    assert unread_keys(TrainConfig, composed, reads) == []


@pytest.mark.parametrize("document", [EngineConfig, RankConfig])
def test_every_key_of_the_process_documents_is_read(document: type[Section], reads: set[str]) -> None:
    def fields(model: type[BaseModel]) -> dict:
        out = {}
        for name, f in model.model_fields.items():
            inner = f.annotation
            out[name] = fields(inner) if isinstance(inner, type) and issubclass(inner, BaseModel) else None
        return out

    assert unread_keys(document, fields(document), reads) == []


def test_an_unread_key_is_found() -> None:
    source = """
class Knobs(Section):
    used: int = 1
    unused: int = 2

    @model_validator(mode="after")
    def check(self):
        return self.unused  # a validator reading the field does not count

def run(k):
    return k.used
"""

    class Knobs(Section):
        used: int = 1
        unused: int = 2

    assert unread_keys(Knobs, {"used": 1, "unused": 2}, attribute_reads([source])) == ["unused"]
