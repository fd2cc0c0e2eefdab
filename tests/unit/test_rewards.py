"""Rewards: the Kimi length table by hand, warm-up, format, think, repeat detection, plugins and composition."""

from __future__ import annotations

import math

import pytest

from engine.rewards import (
    GroupScores,
    LengthRewardConfig,
    RewardConfig,
    RewardPluginError,
    RewardScorer,
    RewardTerm,
    extract_tagged_answer,
    format_reward,
    kimi_length_rewards,
    load_reward_fn,
    score_group,
    think_reward,
)
from engine.tasks.base import Sample

SAMPLE = Sample(uid="s0", prompt="2+2=", answer="4")
NOT_CALLABLE = 3.0


def bonus_reward(response: str, sample: Sample) -> float:
    """A user reward for the plugin tests: 1 per character of the response, capped at 10."""
    return float(min(len(response), 10))


def returns_string(response: str, sample: Sample) -> str:
    return "high"


def returns_nan(response: str, sample: Sample) -> float:
    return math.nan


class Plugins:
    @staticmethod
    def constant(response: str, sample: Sample) -> float:
        return 0.25


class ContainsAnswerTask:
    """Reward 1 when the reference answer appears in the response (a stand-in for a verifier)."""

    name = "fake"

    def samples(self, split: str, n: int, seed: int) -> list[Sample]:
        return [SAMPLE]

    def reward(self, response: str, sample: Sample) -> float:
        return 1.0 if sample.answer in response else 0.0


class ExactTask(ContainsAnswerTask):
    def reward(self, response: str, sample: Sample) -> float:
        return 1.0 if response == sample.answer else 0.0


# ---- Kimi length reward --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lengths", "correct", "expected"),
    [
        ([10, 20, 30], [True, False, True], [0.5, 0.0, -0.5]),
        ([10, 20, 30], [True, True, True], [0.5, 0.0, -0.5]),
        ([10, 15, 30], [False, False, False], [0.0, 0.0, -0.5]),  # short wrong answers get no bonus
        ([10, 15, 30], [True, True, False], [0.5, 0.25, -0.5]),
        ([30, 10, 20, 10], [True, True, False, False], [-0.5, 0.5, 0.0, 0.0]),
        ([7, 7, 7], [True, False, True], [0.0, 0.0, 0.0]),  # all equal: no length signal
        ([5], [True], [0.0]),
        ([], [], []),
    ],
)
def test_kimi_length_rewards_by_hand(lengths: list[int], correct: list[bool], expected: list[float]) -> None:
    assert kimi_length_rewards(lengths, correct) == pytest.approx(expected)


def test_kimi_length_rewards_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="3 lengths but 2"):
        kimi_length_rewards([1, 2, 3], [True, False])
    with pytest.raises(ValueError, match=">= 0"):
        kimi_length_rewards([-1, 2], [True, False])


@pytest.mark.parametrize(
    ("cfg", "iteration", "expected"),
    [
        (LengthRewardConfig(enabled=False, weight=1.0), 100, 0.0),
        (LengthRewardConfig(enabled=True, weight=0.5), 0, 0.5),
        (LengthRewardConfig(enabled=True, weight=2.0, warmup_iterations=10), 9, 0.0),
        (LengthRewardConfig(enabled=True, weight=2.0, warmup_iterations=10), 10, 2.0),
        (LengthRewardConfig(enabled=True, weight=2.0, warmup_iterations=10, ramp_iterations=4), 9, 0.0),
        (LengthRewardConfig(enabled=True, weight=2.0, warmup_iterations=10, ramp_iterations=4), 10, 0.5),
        (LengthRewardConfig(enabled=True, weight=2.0, warmup_iterations=10, ramp_iterations=4), 11, 1.0),
        (LengthRewardConfig(enabled=True, weight=2.0, warmup_iterations=10, ramp_iterations=4), 13, 2.0),
        (LengthRewardConfig(enabled=True, weight=2.0, warmup_iterations=10, ramp_iterations=4), 500, 2.0),
    ],
)
def test_length_warmup_schedule(cfg: LengthRewardConfig, iteration: int, expected: float) -> None:
    assert cfg.scale(iteration) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("kwargs", "bad_key"),
    [
        ({"weight": -1.0}, "weight"),
        ({"warmup_iterations": -1}, "warmup_iterations"),
        ({"ramp_iterations": 1.5}, "ramp_iterations"),
        ({"enabled": "yes"}, "enabled"),
    ],
)
def test_length_config_names_the_bad_key(kwargs: dict[str, object], bad_key: str) -> None:
    with pytest.raises(ValueError, match=f"reward.length.{bad_key}"):
        LengthRewardConfig(**kwargs)  # type: ignore[arg-type]


# ---- format --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "response",
    [
        "<think>2 and 2</think><answer>4</answer>",
        "<think>\nstep one\nstep two\n</think>\n\n<answer> 4 </answer>\n",
        "  <think></think> <answer>4</answer>  ",  # empty thinking is still the format
    ],
)
def test_format_reward_accepts_well_formed(response: str) -> None:
    assert format_reward(response) == 1.0
    assert extract_tagged_answer(response) == "4"


@pytest.mark.parametrize(
    "response",
    [
        "",
        "4",
        "<answer>4</answer>",  # no thinking
        "<think>x</think>",  # no answer
        "<answer>4</answer><think>x</think>",  # wrong order
        "<think>x</think><answer>4</answer><answer>5</answer>",  # two answers
        "<think>x</think><think>y</think><answer>4</answer>",  # two thinks
        "<think>x</think><answer>4</answer> and more",  # text after the answer
        "so: <think>x</think><answer>4</answer>",  # text before the thinking
        "<think>x</think> because <answer>4</answer>",  # text between
        "<think>x<answer>4</answer></think>",  # nested
        "<think>x</think><answer>4",  # unclosed
    ],
)
def test_format_reward_rejects_malformed(response: str) -> None:
    assert format_reward(response) == 0.0
    assert extract_tagged_answer(response) is None


def test_extract_tagged_answer() -> None:
    assert extract_tagged_answer("<think>a</think><answer>\n 42 \n</answer>") == "42"


def test_format_with_think_opened_by_the_prompt() -> None:
    assert format_reward("reasoning</think><answer>4</answer>", think_in_prompt=True) == 1.0
    assert extract_tagged_answer("reasoning</think><answer>4</answer>", think_in_prompt=True) == "4"
    assert format_reward("<think>reasoning</think><answer>4</answer>", think_in_prompt=True) == 0.0
    assert format_reward("reasoning</think><answer>4</answer>") == 0.0


# ---- plugins -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("<think>3 and 4 make 7</think> So the sum is \\boxed{7}.", 1.0),
        ("  <think>\nadd them\n</think>\n7", 1.0),
        ("<think>x</think>", 0.0),  # no answer after the thinking
        ("<think> </think> 7", 0.0),  # no thinking
        ("7 <think>x</think> 7", 0.0),  # text before the thinking
        ("<think>x</think> 7 <think>y</think> 8", 0.0),  # thinking twice
        ("<think>x 7", 0.0),  # unclosed
        ("7", 0.0),
    ],
)
def test_think_reward(response: str, expected: float) -> None:
    assert think_reward(response) == expected


def test_think_opened_by_the_prompt() -> None:
    assert think_reward("add them</think> 7", think_in_prompt=True) == 1.0
    assert think_reward("<think>add them</think> 7", think_in_prompt=True) == 0.0


def test_the_think_term_scores_through_the_scorer() -> None:
    cfg = RewardConfig(terms=[RewardTerm(source="task"), RewardTerm(source="think", weight=0.5)])
    scores = RewardScorer(cfg, ContainsAnswerTask()).score_group(
        ["<think>2 and 2</think>4", "4"], SAMPLE, ["stop", "stop"], [5, 1], iteration=0
    )
    assert scores.terms["think"] == [0.5, 0.0]


def test_plugin_loads_a_function_of_this_module() -> None:
    fn = load_reward_fn(f"{__name__}:bonus_reward")
    assert fn("abc", SAMPLE) == 3.0
    assert load_reward_fn(f"{__name__}:Plugins.constant")("x", SAMPLE) == 0.25


@pytest.mark.parametrize(
    ("path", "match"),
    [
        ("no_colon_here", "must look like"),
        ("a:b:c", "must look like"),
        (":fn", "must look like"),
        ("surely_not_a_module_xyz.sub:fn", "cannot import module 'surely_not_a_module_xyz.sub'"),
        (f"{__name__}:missing_fn", "has no attribute 'missing_fn'"),
        (f"{__name__}:NOT_CALLABLE", "not callable"),
    ],
)
def test_plugin_bad_paths_name_the_path(path: str, match: str) -> None:
    with pytest.raises(RewardPluginError, match=match) as info:
        load_reward_fn(path)
    assert repr(path) in str(info.value)


@pytest.mark.parametrize(("fn_name", "match"), [("returns_string", "must return a number"), ("returns_nan", "nan")])
def test_plugin_bad_results_name_the_path(fn_name: str, match: str) -> None:
    fn = load_reward_fn(f"{__name__}:{fn_name}")
    with pytest.raises(RewardPluginError, match=match) as info:
        fn("x", SAMPLE)
    assert f"{__name__}:{fn_name}" in str(info.value)
    assert "s0" in str(info.value)


def test_scorer_fails_at_construction_on_a_bad_plugin() -> None:
    cfg = RewardConfig(terms=(RewardTerm(source="task"), RewardTerm(source=f"{__name__}:missing_fn")))
    with pytest.raises(RewardPluginError, match="missing_fn"):
        RewardScorer(cfg, ContainsAnswerTask())


# ---- composition ---------------------------------------------------------------------------------


def test_composition_weights_sum_to_the_total() -> None:
    cfg = RewardConfig(
        terms=(
            RewardTerm(source="task", weight=1.0),
            RewardTerm(source="format", weight=0.5),
            RewardTerm(source=f"{__name__}:bonus_reward", weight=0.1, name="bonus"),
        ),
        length=LengthRewardConfig(enabled=True, weight=2.0, warmup_iterations=5),
        repeat_penalty=0.3,
    )
    responses = [
        "<think>a</think><answer>4</answer>",  # 34 chars: correct, formatted
        "the answer is 4",  # 15 chars: correct, not formatted
        "5 5 5 5 5",  # 9 chars: wrong, stopped for repetition
    ]
    lengths = [10, 20, 30]
    scores = score_group(
        responses, SAMPLE, ["stop", "length", "repeat"], lengths, iteration=5, cfg=cfg, task=ContainsAnswerTask()
    )
    expected_terms = {
        "task": [1.0, 1.0, 0.0],
        "format": [0.5, 0.0, 0.0],
        "bonus": [1.0, 1.0, 0.9],
        "length": [2.0 * 0.5, 0.0, 2.0 * -0.5],
        "repeat": [0.0, 0.0, -0.3],
    }
    assert scores.terms.keys() == expected_terms.keys()
    for key, values in expected_terms.items():
        assert scores.terms[key] == pytest.approx(values), key
    assert scores.totals == pytest.approx([3.5, 2.0, -0.4])
    assert scores.correct == [True, True, False]
    means = scores.means()
    assert means["total"] == pytest.approx((3.5 + 2.0 - 0.4) / 3)
    assert means["accuracy"] == pytest.approx(2 / 3)
    # Before the warm-up ends the length term is there but contributes nothing.
    early = RewardScorer(cfg, ContainsAnswerTask()).score_group(responses, SAMPLE, ["stop"] * 3, lengths, 4)
    assert early.terms["length"] == [0.0, 0.0, 0.0]
    assert early.totals == pytest.approx([2.5, 2.0, 0.9])


def test_default_config_is_the_task_reward_alone() -> None:
    scores = score_group(
        ["4", "5"], SAMPLE, ["stop", "stop"], [1, 1], iteration=0, cfg=RewardConfig(), task=ExactTask()
    )
    assert scores == GroupScores(totals=[1.0, 0.0], terms={"task": [1.0, 0.0]}, correct=[True, False])


def test_task_sees_only_the_answer_part() -> None:
    cfg = RewardConfig(task_input="answer")
    responses = ["<think>it is 5? no</think><answer>4</answer>", "4", "<think>x</think><answer>5</answer>"]
    scores = score_group(responses, SAMPLE, ["stop"] * 3, [1, 1, 1], iteration=0, cfg=cfg, task=ExactTask())
    assert scores.terms["task"] == [1.0, 0.0, 0.0]  # the bare "4" has no <answer> part


def test_correct_threshold_drives_the_length_term() -> None:
    class HalfTask(ContainsAnswerTask):
        def reward(self, response: str, sample: Sample) -> float:
            return 0.5

    lengths = [10, 30]
    for threshold, correct in ((0.5, [True, True]), (0.6, [False, False])):
        cfg = RewardConfig(correct_threshold=threshold, length=LengthRewardConfig(enabled=True))
        scores = score_group(["a", "b"], SAMPLE, ["stop"] * 2, lengths, iteration=0, cfg=cfg, task=HalfTask())
        assert scores.correct == correct
        assert scores.terms["length"] == ([0.5, -0.5] if correct[0] else [0.0, -0.5])


def test_score_group_rejects_bad_groups() -> None:
    scorer = RewardScorer(RewardConfig(), ExactTask())
    with pytest.raises(ValueError, match="unfinished"):
        scorer.score_group(["4"], SAMPLE, ["length_budget"], [1], 0)
    with pytest.raises(ValueError, match="finish reason must be one of"):
        scorer.score_group(["4"], SAMPLE, ["eos"], [1], 0)
    with pytest.raises(ValueError, match="must be equal"):
        scorer.score_group(["4", "4"], SAMPLE, ["stop"], [1, 1], 0)
    with pytest.raises(ValueError, match="at least one response"):
        scorer.score_group([], SAMPLE, [], [], 0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"terms": ()}, "at least one term"),
        ({"terms": (RewardTerm(source="task"), RewardTerm(source="task"))}, r"\['task'\] are repeated or reserved"),
        ({"terms": (RewardTerm(source="format", name="length"),)}, "reserved"),
        ({"repeat_penalty": -1.0}, "reward.repeat_penalty"),
        ({"task_input": "prompt"}, r"reward.task_input must be one of \['response', 'answer'\], got 'prompt'"),
        ({"correct_threshold": "1"}, "reward.correct_threshold"),
    ],
)
def test_reward_config_names_the_bad_key(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RewardConfig(**kwargs)  # type: ignore[arg-type]


def test_reward_term_validation() -> None:
    with pytest.raises(ValueError, match=r"one of \('task', 'format', 'think'\) or 'package.module:function'"):
        RewardTerm(source="lenght")
    with pytest.raises(ValueError, match=r"reward.terms\[\].weight must be a number, got '1'"):
        RewardTerm(source="task", weight="1")  # type: ignore[arg-type]


def test_reward_config_from_dict() -> None:
    cfg = RewardConfig.from_dict(
        {
            "terms": [{"source": "task"}, {"source": "format", "weight": 0.2}],
            "length": {"enabled": True, "warmup_iterations": 3},
            "repeat_penalty": 1.0,
        }
    )
    assert cfg.terms == (RewardTerm(source="task"), RewardTerm(source="format", weight=0.2))
    assert cfg.length == LengthRewardConfig(enabled=True, warmup_iterations=3)
    with pytest.raises(ValueError, match=r"\['reward.repeat_penalt'\] \(did you mean \['repeat_penalty'\]\?\)"):
        RewardConfig.from_dict({"repeat_penalt": 1.0})
    with pytest.raises(ValueError, match=r"\['reward.length.warmup'\]; valid keys of reward.length: \["):
        RewardConfig.from_dict({"length": {"warmup": 3}})
    with pytest.raises(ValueError, match=r"\['reward.terms\[\].wieght'\] \(did you mean \['weight'\]\?\)"):
        RewardConfig.from_dict({"terms": [{"source": "task"}, {"source": "format", "wieght": 1.0}]})
