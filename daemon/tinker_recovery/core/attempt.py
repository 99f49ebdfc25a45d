"""The attempt's exactly-once rules, as pure functions of what was observed.

The shell (shell/executor.py, shell/reconcile.py) carries an attempt out and writes each step in
one store transaction; this module says what it may do. Nothing here reads a clock or a store:
the step, the epochs and the listing's verdicts are arguments, so every rule is a table test
(tests/core/test_attempt.py).

The rules, in words:
- An attempt belongs to the lease epoch it was started (or last adopted) under. Work from
  another epoch may neither write nor hand off: after a takeover the new term adopts the row.
- Before HANDING_OFF nothing has left the daemon, so an interrupted attempt is abandoned. From
  HANDING_OFF on the job may have been started, so the attempt is only ever confirmed.
- A successor confirms the attempt only by progress seen after it appeared (a later request than
  the first one seen, or a newer training checkpoint); a corrupted one only by a newer checkpoint.
- A run absent from a listing proves nothing: an attempt whose successor was seen never fails for
  that; it fails only at its deadline.
- A successor that appeared and then died or was corrupted before any progress points at the
  checkpoint it started from: that checkpoint becomes suspect for the lineage.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from tinker_recovery.core.model import AttemptOutcome, AttemptStep

# Steps at which the handoff has certainly not happened: abandoning them is safe.
BEFORE_HANDOFF = frozenset(
    {
        AttemptStep.CREATED,
        AttemptStep.SELECTING,
        AttemptStep.PROTECTING,
        AttemptStep.RESTORING,
    }
)


def is_stale(attempt_epoch: int | None, current_epoch: int | None) -> bool:
    """Work started under another lease epoch than the one we hold now (None: unfenced)."""
    return (
        attempt_epoch is not None and current_epoch is not None and attempt_epoch != current_epoch
    )


def may_hand_off(*, attempt_epoch: int | None, leader_epoch: int | None, is_leader: bool) -> bool:
    """The one side effect no store write can fence: allowed only while we lead in the epoch
    the attempt belongs to."""
    if not is_leader:
        return False
    return attempt_epoch is None or attempt_epoch == leader_epoch


class Settle(StrEnum):
    """What to do with an attempt nobody is carrying out (after a crash, takeover, lost task)."""

    ABANDON = "abandon"  # nothing left the daemon: finish it as abandoned
    CONFIRM = "confirm"  # the handoff may have happened: watch for its successor only


def settle(step: AttemptStep) -> Settle:
    return Settle.ABANDON if step in BEFORE_HANDOFF else Settle.CONFIRM


class Interruption(StrEnum):
    CANCELLED = "cancelled"  # shutdown or leadership lost
    CRASHED = "crashed"  # a bug or a store error inside a step
    WITHHELD = "withheld"  # the handoff was about to run but we no longer lead


def after_interruption(step: AttemptStep, cause: Interruption) -> AttemptOutcome | None:
    """The outcome to record for an interrupted attempt, or None to keep the row unfinished
    for confirmation (the handoff may have reached the job)."""
    if cause is Interruption.WITHHELD:
        return AttemptOutcome.ABANDONED  # we stopped ourselves right before the handoff
    if step not in BEFORE_HANDOFF:
        return None
    return AttemptOutcome.ABANDONED if cause is Interruption.CANCELLED else AttemptOutcome.FAILED


@dataclass(frozen=True, slots=True)
class Sighting:
    """What one consistent listing showed of an attempt's successor."""

    present: bool  # a successor run is in the listing
    corrupted: bool = False
    progressed: bool = False  # progress after it appeared (see module docstring)
    checkpointed: bool = False  # ... of which a newer training checkpoint: durable progress
    seen_before: bool = False  # this attempt already had a successor recorded


@dataclass(frozen=True, slots=True)
class Clocks:
    past_deadline: bool  # the confirm deadline has passed
    handoff_failed: bool = False  # the handoff reported a failure that may have started the job
    grace_over: bool = False  # ... its grace passed AND a listing made after it agreed


class Verdict(StrEnum):
    WAIT = "wait"
    SUCCEED = "succeed"
    FAIL = "fail"  # no successor: the handoff did not reach a job
    FAIL_SUSPECT = "fail_suspect"  # the successor died or broke before progress


def confirm(sighting: Sighting, clocks: Clocks) -> Verdict:
    """Judge a handed-off attempt against one consistent listing."""
    if sighting.present:
        if sighting.corrupted:
            # Corrupted after a newer checkpoint: the recovery worked and this is a new incident
            # for the lineage. Corrupted without one: its starting checkpoint is suspect.
            return Verdict.SUCCEED if sighting.checkpointed else Verdict.FAIL_SUSPECT
        if sighting.progressed:
            return Verdict.SUCCEED
        if clocks.past_deadline:
            return Verdict.FAIL_SUSPECT
        return Verdict.WAIT
    if sighting.seen_before:
        # Absent from this listing only: not evidence. The deadline still bounds the wait.
        return Verdict.FAIL_SUSPECT if clocks.past_deadline else Verdict.WAIT
    if clocks.handoff_failed and clocks.grace_over:
        return Verdict.FAIL
    return Verdict.FAIL if clocks.past_deadline else Verdict.WAIT
