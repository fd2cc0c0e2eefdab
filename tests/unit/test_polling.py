"""`poll_until` asks until an answer or the deadline, and asks once more at the deadline."""

from __future__ import annotations

from checkpoint_engine.contracts.polling import Deadline, poll_until


class FakeTime:
    def __init__(self) -> None:
        self.now, self.slept = 0.0, []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_the_first_answer_comes_back_and_the_waits_between_asks_are_every_seconds() -> None:
    t, answers = FakeTime(), iter([None, None, "here"])
    assert poll_until(lambda: next(answers), 10, every=0.5, clock=t.clock, sleep=t.sleep) == "here"
    assert t.slept == [0.5, 0.5]


def test_no_answer_is_none_after_one_last_ask_at_the_deadline() -> None:
    t, asked = FakeTime(), []
    assert poll_until(lambda: asked.append(t.now), 1.2, every=0.5, clock=t.clock, sleep=t.sleep) is None
    assert asked == [0.0, 0.5, 1.0, 1.2]  # the last wait is cut to the deadline


def test_a_deadline_clamps_what_is_left() -> None:
    t = FakeTime()
    deadline = Deadline(3.0, t.clock)
    assert (deadline.left(), deadline.left(at_most=1.0), deadline.passed()) == (3.0, 1.0, False)
    t.now = 5.0
    assert (deadline.left(), deadline.left(at_least=0.1), deadline.passed()) == (0.0, 0.1, True)
