"""`scratchpad`: addition written out column by column, with a long tail of long problems.

The prompt is `a+b=` as in `addition`; the expected response works the columns from the right and
then states the sum after `#`:

    47+385=   ->   7+5=12;4+8+1=13;0+3+1=4#432

Each column costs about seven tokens, and the number of columns has a long tail: each operand has
d digits with probability proportional to 2**-d (1..max_digits), so most responses take one or two
columns and a few take many. That is the length distribution partial rollouts are for: a budget per
iteration below the longest response lets the short ones finish while the long ones continue next
iteration. Only the sum after `#` is rewarded (exact, or per digit aligned from the right); the
worked columns are what the cold start demonstrates.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from engine.tasks.addition import AdditionTask
from engine.tasks.base import RewardKind, Sample, Split, distinct_samples, first_line

ANSWER_MARK = "#"


def worked_sum(a: int, b: int) -> str:
    """The columns of a + b from the right, each `x+y[+1]=s`, then `#` and the sum."""
    da, db = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        total = x + y + carry
        steps.append(f"{x}+{y}{'+1' if carry else ''}={total}")
        carry = total // 10
    return ";".join(steps) + ANSWER_MARK + str(a + b)


def stated_answer(response: str) -> str | None:
    """The sum a response states: what follows the last `#` on its first line (None without one)."""
    line = first_line(response)
    return line.rsplit(ANSWER_MARK, 1)[1].strip() if ANSWER_MARK in line else None


@dataclass
class ScratchpadTask(AdditionTask):
    """Operands have 1..`max_digits` digits, d with weight 2**-d; difficulty is the number of columns.
    The reward is addition's, on the sum the response states after `#`."""

    max_digits: int = 6
    reward_kind: RewardKind = "partial"
    name: str = "scratchpad"

    def _operand(self, rng: random.Random) -> int:
        digits = rng.choices(range(1, self.max_digits + 1), weights=[2.0**-d for d in range(1, self.max_digits + 1)])[0]
        return rng.randrange(10 ** (digits - 1) if digits > 1 else 0, 10**digits)

    def samples(self, split: Split, n: int, seed: int) -> list[Sample]:
        def draw(rng: random.Random) -> Sample:
            a, b = self._operand(rng), self._operand(rng)
            columns = max(len(str(a)), len(str(b)))
            return Sample(
                uid=f"pad:{a}+{b}",
                prompt=f"{a}+{b}=",
                answer=str(a + b),
                difficulty=float(columns),
                demonstration=worked_sum(a, b),
            )

        return distinct_samples(
            draw,
            split,
            n,
            seed=f"{self.name}:{seed}",
            heldout_fraction=self.heldout_fraction,
            task=f"scratchpad(max_digits={self.max_digits})",
        )

    def answer(self, response: str) -> str | None:
        return stated_answer(response) or None
