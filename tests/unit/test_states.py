"""The run state machine: the one table of legal transitions."""

from __future__ import annotations

import itertools

import pytest

from hpc_compute.errors import IllegalTransition
from hpc_compute.ledger.states import LEGAL, TERMINAL_STATES, RunState, check_transition

Q, SUB, P, R, OK, F, C = (
    RunState.QUEUED,
    RunState.SUBMITTING,
    RunState.PENDING,
    RunState.RUNNING,
    RunState.SUCCEEDED,
    RunState.FAILED,
    RunState.CANCELLED,
)

# Written out by hand from the design (not derived from LEGAL), so a change to the table shows here.
EXPECTED_LEGAL = {
    (Q, SUB), (Q, C),
    (SUB, P), (SUB, R), (SUB, Q), (SUB, OK), (SUB, F), (SUB, C),
    (P, R), (P, Q), (P, OK), (P, F), (P, C),
    (R, Q), (R, OK), (R, F), (R, C),
}  # fmt: skip
ALL_PAIRS = [(a, b) for a, b in itertools.product(RunState, RunState) if a != b]


def test_table_covers_every_state() -> None:
    assert set(LEGAL) == set(RunState)
    assert {(a, b) for a, targets in LEGAL.items() for b in targets} == EXPECTED_LEGAL


@pytest.mark.parametrize(("current", "target"), sorted(EXPECTED_LEGAL))
def test_legal_transitions(current: RunState, target: RunState) -> None:
    check_transition(current, target)


@pytest.mark.parametrize(("current", "target"), sorted(set(ALL_PAIRS) - EXPECTED_LEGAL))
def test_illegal_transitions(current: RunState, target: RunState) -> None:
    with pytest.raises(IllegalTransition) as info:
        check_transition(current, target)
    assert str(current) in str(info.value) and str(target) in str(info.value)


@pytest.mark.parametrize(
    ("current", "target"),
    [(Q, P), (Q, R), (Q, OK), (Q, F), (P, SUB), (R, SUB), (R, P), (OK, Q), (F, Q), (C, Q), (F, OK), (OK, F)],
)
def test_notable_illegal_transitions(current: RunState, target: RunState) -> None:
    """Skipping submission, going backwards, resurrecting a finished run."""
    with pytest.raises(IllegalTransition):
        check_transition(current, target)


@pytest.mark.parametrize("state", sorted(TERMINAL_STATES))
def test_terminal_states_are_frozen(state: RunState) -> None:
    assert state.terminal
    assert LEGAL[state] == frozenset()
    for target in RunState:
        with pytest.raises(IllegalTransition):
            check_transition(state, target)  # not even to itself


@pytest.mark.parametrize("state", [Q, SUB, P, R])
def test_active_states_no_op_is_legal(state: RunState) -> None:
    assert not state.terminal
    check_transition(state, state)


def test_terminal_set() -> None:
    assert {OK, F, C} == TERMINAL_STATES
