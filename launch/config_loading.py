"""From Hydra overrides to a checked `TrainConfig`: composition and the one-line errors users see.

The defaults live in the section models (`TrainConfig().to_dict()`); they are registered with
Hydra's ConfigStore as `timeshare_defaults`, the first entry of `conf/config.yaml`'s defaults list,
so every key can be overridden by name and the YAML group files state only what their option
changes. Consumes `conf/` and overrides such as `algo=grpo rollout.group_size=4`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from checkpoint_engine.contracts.config import ConfigError
from launch.train_config import TrainConfig

if TYPE_CHECKING:
    import omegaconf

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
DEFAULTS_NAME = "timeshare_defaults"


def _register_defaults() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=DEFAULTS_NAME, node=TrainConfig().to_dict())


def compose(overrides: list[str], config_dir: Path | None = None) -> omegaconf.DictConfig:
    """Compose `config.yaml` of `config_dir` (default: the repository's conf/) with Hydra overrides."""
    import hydra
    from hydra.errors import HydraException, MissingConfigException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    _register_defaults()
    conf = (config_dir or CONF_DIR).resolve()
    try:
        with hydra.initialize_config_dir(version_base=None, config_dir=str(conf)):
            return hydra.compose("config", overrides=list(overrides))
    except OverrideParseException as e:
        raise ConfigError(f"cannot parse override {_bad_override(overrides)!r}: {e}") from e
    except MissingConfigException as e:
        raise ConfigError(_missing_option_message(e, conf)) from e
    except (HydraException, OmegaConfBaseException) as e:
        match = re.match(r"Could not override '([^']+)'", str(e))
        if match:
            _check_key_path(match.group(1))  # a misspelt key: name it with the valid keys
        raise ConfigError(f"cannot compose the configuration with {overrides}: {e}") from e


def to_config(composed: omegaconf.DictConfig) -> TrainConfig:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        data = OmegaConf.to_container(composed, resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot resolve the configuration: {e}") from e
    return TrainConfig.from_dict(data)


def load_config(overrides: list[str], config_dir: Path | None = None) -> TrainConfig:
    """Compose and check, once, at start-up."""
    return to_config(compose(overrides, config_dir))


def _bad_override(overrides: list[str]) -> str:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    for override in overrides:
        try:
            parser.parse_overrides([override])
        except OverrideParseException:
            return override
    return " ".join(overrides)


def _missing_option_message(error: Exception, conf: Path) -> str:
    """Hydra's first line, then the options of the group from the files."""
    text = str(error)
    match = re.search(r"Could not find '([^']+)/[^'/]+'", text)
    if not match:
        return f"{text.split('Config search path', maxsplit=1)[0].strip()} (config dir {conf})"
    (group,) = match.groups()
    options = sorted(p.stem for p in (conf / group).glob("*.yaml"))
    return f"{text.splitlines()[0]}; available options of {group}: {options}"


def _check_key_path(dotted: str) -> None:
    """Raise the unknown-key error for `dotted` (e.g. rollout.temprature) if the schema lacks it."""
    data: dict = {}
    cursor = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        cursor[part] = {}
        cursor = cursor[part]
    cursor[parts[-1]] = None
    try:
        TrainConfig.from_dict(data)
    except ConfigError as e:
        if str(e).startswith("unknown key"):
            raise


def resumed_config(given: TrainConfig, overrides: list[str], saved_path: Path, job: str) -> TrainConfig:
    """The config a resumed run (`resume=`, the run directory named `job`) runs with: its saved one. Only the
    cluster section, where the job's processes run (a new slurm allocation, the joining arguments of a node
    after the head), may be given anew, with as many nodes; any other override must agree with the saved value."""
    import json

    saved = TrainConfig.from_dict(json.loads(saved_path.read_text()))
    new, old = given.to_dict(), saved.to_dict()
    keys = [o.split("=", 1)[0].lstrip("+~") for o in overrides]
    differ = [
        o
        for o, k in zip(overrides, keys, strict=True)
        if k.split(".")[0] not in ("resume", "cluster") and _lookup(new, k) != _lookup(old, k)
    ]
    if differ:
        raise ConfigError(
            f"resume={given.resume} runs with the run's saved config and only cluster.* may change; "
            f"{differ} differ from it: drop them"
        )
    if not any(k.split(".")[0] == "cluster" for k in keys):
        return saved
    if len(given.cluster.nodes) != len(saved.cluster.nodes):
        raise ConfigError(
            f"resume={given.resume}: the run has {len(saved.cluster.nodes)} nodes (data parallel over them), "
            f"cluster.nodes gives {len(given.cluster.nodes)}; resume it on as many"
        )
    return saved.model_copy(update={"cluster": given.cluster.model_copy(update={"job": job})})


def _lookup(data: dict, dotted: str) -> object:
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data
