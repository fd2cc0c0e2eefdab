"""The phase machine: order, versions, refusals that name both states, serialisation."""

from __future__ import annotations

import pytest

from checkpoint_engine.contracts.phases import (
    CYCLE,
    FIRST_PHASE,
    TABLE,
    IllegalTransition,
    Owner,
    Phase,
    PhaseState,
    Version,
    begun_at,
    check_transition,
    fail,
    initial_state,
    next_state,
    next_turn,
    owned_by,
    spec,
    successor,
    trained_through,
)


def test_two_iterations_walk_the_cycle_with_versions() -> None:
    s = initial_state()
    seen = [(s.iteration, s.phase, s.weight_version)]
    for _ in range(2 * len(CYCLE)):
        n = next_state(s)
        check_transition(s, n)
        s = n
        seen.append((s.iteration, s.phase, s.weight_version))
    assert seen[:7] == [
        (0, Phase.EXPORT, 0),
        (0, Phase.START_VLLM, 0),
        (0, Phase.UPDATE_WEIGHTS, 0),
        (0, Phase.ROLLOUT, 0),
        (0, Phase.TERMINATE_VLLM, 0),
        (0, Phase.ONLOAD, 0),
        (1, Phase.TRAIN, 0),
    ]
    assert (1, Phase.EXPORT, 1) in seen
    assert seen[-1] == (2, Phase.EXPORT, 2)


@pytest.mark.parametrize("target", [Phase.ROLLOUT, Phase.TRAIN, Phase.EXPORT])
def test_skipping_a_phase_is_refused_with_both_names(target: Phase) -> None:
    cur = PhaseState(iteration=3, phase=Phase.START_VLLM, weight_version=3)
    with pytest.raises(IllegalTransition, match=rf"START_VLLM \(iteration 3\) -> {target.value}.*UPDATE_WEIGHTS"):
        check_transition(cur, PhaseState(iteration=3, phase=target, weight_version=3))


def test_wrong_iteration_or_version_is_refused() -> None:
    cur = PhaseState(iteration=3, phase=Phase.ONLOAD, weight_version=3)
    with pytest.raises(IllegalTransition):
        check_transition(cur, PhaseState(iteration=3, phase=Phase.TRAIN, weight_version=3))
    check_transition(cur, PhaseState(iteration=4, phase=Phase.TRAIN, weight_version=3))


def test_failure_is_final() -> None:
    cur = PhaseState(iteration=2, phase=Phase.ROLLOUT, weight_version=2)
    failed = fail(cur)
    check_transition(cur, failed)
    with pytest.raises(IllegalTransition, match="FAILED has no successor"):
        next_state(failed)
    with pytest.raises(IllegalTransition, match="recovery"):
        check_transition(failed, cur)


def test_round_trip_and_schema() -> None:
    s = PhaseState(iteration=5, phase=Phase.UPDATE_WEIGHTS, weight_version=5, started_at=12.5)
    assert PhaseState.from_dict(s.to_dict()) == s
    with pytest.raises(ValueError, match="schema 2"):
        PhaseState.from_dict({**s.to_dict(), "schema": 2})


def test_the_table_names_each_phase_owner_and_the_version_it_carries() -> None:
    assert owned_by(Owner.TRAINER) == (Phase.TRAIN, Phase.OFFLOAD, Phase.EXPORT, Phase.ONLOAD)
    assert owned_by(Owner.TRAINER, starting=FIRST_PHASE) == (Phase.EXPORT, Phase.ONLOAD)
    assert owned_by(Owner.TRAINER, starting=Phase.ROLLOUT) == (Phase.ONLOAD,)
    assert owned_by(Owner.ENGINE) == (Phase.START_VLLM, Phase.UPDATE_WEIGHTS, Phase.TERMINATE_VLLM)
    assert owned_by(Owner.CONTROLLER) == (Phase.ROLLOUT,)
    # The state machine's versions follow the table: EXPORTED phases carry the iteration's new version.
    s = PhaseState(iteration=4, phase=Phase.TRAIN, weight_version=3)
    for _ in range(len(CYCLE)):
        expected = s.iteration if spec(s.phase).version is Version.EXPORTED else s.iteration - 1
        assert s.weight_version == expected, s
        s = next_state(s)
    with pytest.raises(ValueError, match="FAILED is not a phase of the cycle"):
        spec(Phase.FAILED)


def test_each_process_handles_exactly_the_phases_it_owns() -> None:
    """The handler maps of the trainer ranks and of the engine cover their owners' phases of the table, and the
    engine begins early exactly the phases the table says begin early."""
    from checkpoint_engine.node_engine import NodeEngine
    from sidecars.megatron.rank_main import Rank

    assert set(Rank.HANDLERS) == set(owned_by(Owner.TRAINER))
    assert set(NodeEngine.HANDLERS) == set(owned_by(Owner.ENGINE))
    assert set(NodeEngine.STAND_INS) <= set(owned_by(Owner.TRAINER))
    assert set(NodeEngine.EARLY) == {s.phase for s in TABLE if s.begins_at is not None}
    assert owned_by(Owner.CONTROLLER) == (Phase.ROLLOUT,)  # Controller.run does it inline


def test_a_phase_begun_early_begins_before_its_turn() -> None:
    for s in TABLE:
        if s.begins_at is not None:
            assert CYCLE.index(s.begins_at) < CYCLE.index(s.phase), s.phase
            assert s.phase in begun_at(s.begins_at)
    assert begun_at(Phase.EXPORT) == (Phase.START_VLLM,)


def test_successor_wraps_into_the_next_iteration() -> None:
    assert successor(3, Phase.ONLOAD) == (4, Phase.TRAIN)
    assert successor(3, Phase.ROLLOUT) == (3, Phase.TERMINATE_VLLM)


@pytest.mark.parametrize(
    ("at", "turn", "checkpoint"),
    [
        ((2, Phase.TRAIN), (2, Phase.TRAIN), 1),  # TRAIN 2 learns on top of TRAIN 1's result
        ((2, Phase.OFFLOAD), (2, Phase.OFFLOAD), 2),
        ((2, Phase.START_VLLM), (2, Phase.ONLOAD), 2),
        ((2, Phase.ROLLOUT), (2, Phase.ONLOAD), 2),
        ((2, Phase.TERMINATE_VLLM), (2, Phase.ONLOAD), 2),
        ((0, Phase.UPDATE_WEIGHTS), (0, Phase.ONLOAD), 0),
    ],
)
def test_a_restarted_trainer_takes_up_its_next_phase_from_the_checkpoint_that_phase_needs(
    at: tuple[int, Phase], turn: tuple[int, Phase], checkpoint: int
) -> None:
    iteration, phase = at
    state = PhaseState(iteration=iteration, phase=phase, weight_version=iteration)
    assert next_turn(state, Owner.TRAINER) == turn
    assert trained_through(*turn) == checkpoint


def test_the_controller_takes_up_rollout_and_nothing_follows_failed() -> None:
    after_onload = PhaseState(iteration=3, phase=Phase.ONLOAD, weight_version=3)
    assert next_turn(after_onload, Owner.CONTROLLER) == (4, Phase.ROLLOUT)  # past TRAIN: the next iteration's
    with pytest.raises(IllegalTransition, match="FAILED in iteration 3"):
        next_turn(fail(after_onload), Owner.TRAINER)
