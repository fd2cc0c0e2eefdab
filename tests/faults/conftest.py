"""The fault suite's record: each test notes the faults it injected and what its run made of them, and the
suite ends with one line: faults injected, survived, prompts lost, prompts repeated, leaks, recovery times."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest


@dataclass
class Fault:
    name: str
    survived: bool = False
    lost: int = 0
    repeated: int = 0
    leaks: int = 0
    recovery_seconds: float | None = None  # from the fault to the job (or its cleanup) being whole again


@dataclass
class FaultReport:
    faults: list[Fault] = field(default_factory=list)

    def injected(self, name: str) -> Fault:
        self.faults.append(Fault(name))
        return self.faults[-1]

    def summary(self) -> str:
        f = self.faults
        times = ", ".join(f"{x.name} {x.recovery_seconds:.1f} s" for x in f if x.recovery_seconds is not None)
        return (
            f"faults: {len(f)} injected, {sum(x.survived for x in f)} survived, {sum(x.lost for x in f)} prompts "
            f"lost, {sum(x.repeated for x in f)} prompts repeated, {sum(x.leaks for x in f)} leaks"
            + (f"; recovery: {times}" if times else "")
        )


_REPORT = FaultReport()


@pytest.fixture
def faults() -> FaultReport:
    return _REPORT


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _REPORT.faults:
        terminalreporter.write_line(_REPORT.summary())
