"""`timeshare long2short merge`'s arithmetic and refusals, and the cold start's records file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from checkpoint_engine.contracts.config import ConfigError
from engine.tiny_model import TinyModelSpec, write_tiny_model
from launch.config_loading import load_config
from launch.long2short import merge, merge_weights, model_dir_of
from launch.run_setup import cold_start_examples, read_sft_pairs


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("l2s")
    return tuple(write_tiny_model(root / f"m{seed}", TinyModelSpec(layers=1, seed=seed)) for seed in (0, 1))


def test_merge_writes_the_weighted_average_with_as_config(models: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = models
    summary = merge(a, b, tmp_path / "out", 0.3)
    wa, wb, out = (load_file(str(d / "model.safetensors")) for d in (a, b, tmp_path / "out"))
    assert summary["tensors"] == len(out) == len(wa)
    for name, x in out.items():
        assert x.dtype == wa[name].dtype
        torch.testing.assert_close(x, 0.3 * wa[name] + 0.7 * wb[name])
    assert (tmp_path / "out" / "config.json").read_text() == (a / "config.json").read_text()
    assert (tmp_path / "out" / "tokenizer_config.json").is_file()
    run = tmp_path / "run"
    (run / "hf").mkdir(parents=True)
    (run / "hf" / "config.json").write_text("{}")
    assert model_dir_of(run) == run / "hf"  # a run directory stands for its final model


def test_merge_refuses_what_cannot_be_averaged(models: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = models
    with pytest.raises(ConfigError, match=r"--weight must be in \[0, 1\] \(the share of A\), got 1.5"):
        merge(a, b, tmp_path / "out", 1.5)
    with pytest.raises(ConfigError, match="exists; name a new directory"):
        merge(a, b, tmp_path, 0.5)
    with pytest.raises(ConfigError, match="neither an HF model directory nor a run directory"):
        merge(a, tmp_path, tmp_path / "out", 0.5)
    x = {"w": torch.ones(2, 2)}
    with pytest.raises(ConfigError, match=r"tensor w has shape \(2, 2\) in A and \(3,\) in B"):
        merge_weights(x, {"w": torch.ones(3)}, 0.5)
    with pytest.raises(ConfigError, match=r"\['v'\] are in one only"):
        merge_weights(x, {**x, "v": torch.ones(1)}, 0.5)
    assert not (tmp_path / "out").exists()


def test_the_cold_start_trains_on_every_record_of_its_data(models: tuple[Path, Path], tmp_path: Path) -> None:
    from engine.tokenizer import load_tokens

    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"prompt": "1+2=", "response": "3", "tokens": 1}) + "\n\n")
    cfg = load_config([f"trainer.cold_start.data={data}", "task=addition"])
    tokens = load_tokens(models[0], "\n", False, [])
    assert cold_start_examples(cfg, [], tokens, "\n") == [[tokens.encode("1+2="), tokens.encode_response("3\n")]]
    for text, message in (
        ("", "holds no records"),
        ("{", "sft.jsonl:1: not valid JSON"),
        ('{"prompt": "1+2="}', "sft.jsonl:1: a cold-start record needs non-empty strings 'prompt' and 'response'"),
    ):
        data.write_text(text)
        with pytest.raises(ConfigError, match=message):
            read_sft_pairs(data)
    with pytest.raises(ConfigError, match="is not a file"):
        read_sft_pairs(tmp_path / "absent.jsonl")
