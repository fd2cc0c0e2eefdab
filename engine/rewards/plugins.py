"""User reward functions, named by import path "package.module:function".

Consumes the path; produces a callable fn(response: str, sample: Sample) -> float that checks
each result is a finite number. Every failure (malformed path, import error, missing or
non-callable attribute, a non-number or NaN returned) raises `RewardPluginError` naming the path.
"""

from __future__ import annotations

import importlib
import math
import numbers
import re
from collections.abc import Callable
from dataclasses import dataclass

from checkpoint_engine.contracts.config import ConfigError
from engine.tasks.base import Sample

RewardFn = Callable[[str, Sample], float]
_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


class RewardPluginError(ConfigError):
    """A user reward function could not be loaded, or returned something that is not a reward."""


def is_import_path(text: str) -> bool:
    return ":" in text


@dataclass(frozen=True)
class PluginReward:
    """A loaded user function; calling it validates the result."""

    path: str
    fn: RewardFn

    def __call__(self, response: str, sample: Sample) -> float:
        value = self.fn(response, sample)
        # numbers.Real covers int, float, bool and numpy scalars; a tensor or a string is a bug.
        if not isinstance(value, numbers.Real):
            raise RewardPluginError(
                f"reward function {self.path!r} returned {type(value).__name__} ({value!r:.80}) for sample "
                f"{sample.uid!r}; it must return a number"
            )
        value = float(value)
        if not math.isfinite(value):
            raise RewardPluginError(f"reward function {self.path!r} returned {value} for sample {sample.uid!r}")
        return value


def load_reward_fn(path: str) -> PluginReward:
    """Import `path` ("package.module:function", the function part may be dotted: "mod:Class.method")."""
    if not isinstance(path, str) or not _PATH.fullmatch(path):
        raise RewardPluginError(f"reward function path {path!r} must look like 'package.module:function'")
    module_name, attr_path = path.split(":")
    try:
        obj: object = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or whatever the module raises while it loads
        raise RewardPluginError(f"reward function {path!r}: cannot import module {module_name!r} ({e})") from e
    for attr in attr_path.split("."):
        try:
            obj = getattr(obj, attr)
        except AttributeError as e:
            raise RewardPluginError(f"reward function {path!r}: {type(obj).__name__} has no attribute {attr!r}") from e
    if not callable(obj):
        raise RewardPluginError(f"reward function {path!r} is a {type(obj).__name__}, not callable")
    return PluginReward(path=path, fn=obj)
