"""Checkpoint selection for an attempt: choose, validate, protect and (restore: sdk) prove one.

The executor (shell/executor.py) calls `Checkpoints.prepare` as an attempt's first steps and hands
off whatever it returns. Ranking and validation rules live in core/ranking.py; this module only
asks the service (listings, weights_info, TTL, the SDK restore) and records each step through the
ledger (shell/ledger.py) before taking it. It never hands off and never finishes an attempt: it
ends one by raising `AttemptFinished`, which the executor turns into an outcome.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import structlog

from tinker_recovery.core import ranking
from tinker_recovery.core.model import (
    Attempt,
    AttemptOutcome,
    AttemptStep,
    CheckpointView,
    Lineage,
    RunView,
    WeightsInfo,
)
from tinker_recovery.errors import ActionFailed, RemoteRejected, RemoteUnavailable
from tinker_recovery.shell.clock import Clock
from tinker_recovery.shell.ledger import AttemptFinished, Ledger, Tracked
from tinker_recovery.shell.restore import RestoreResult
from tinker_recovery.shell.store.base import Store

log = structlog.get_logger(__name__)

# Earlier runs of a lineage whose checkpoints are listed as fallbacks; bounds per-attempt calls.
_MAX_EARLIER_RUNS = 8

# Answers to weights_info that are a verdict on the checkpoint named in the request: its path
# does not parse or resolve (400/422), or it does not exist (404/410). Everything else (401, 403,
# 429, 5xx, a transport error, a 2xx body that does not fit the model) is about our credentials,
# the service or the wire, and never marks a checkpoint bad: nothing clears bad_checkpoints.
_CHECKPOINT_VERDICTS = frozenset({400, 404, 410, 422})
# list_checkpoints answers that mean "this run and its checkpoints are gone".
_RUN_GONE = frozenset({404, 410})


def _is_verdict_on_checkpoint(exc: RemoteRejected) -> bool:
    # A MalformedResponse carries the 2xx status it arrived with (or none), so it never matches.
    return exc.status_code in _CHECKPOINT_VERDICTS


class Gateway(Protocol):
    """The part of shell/gateway.py the executor's checkpoint steps use."""

    async def list_checkpoints(self, run_id: str) -> list[CheckpointView]: ...

    async def weights_info(self, tinker_path: str) -> WeightsInfo: ...

    async def set_checkpoint_ttl(self, tinker_path: str, ttl_s: int | None) -> None: ...


class Restorer(Protocol):
    async def restore(
        self,
        checkpoint_path: str,
        *,
        with_optimizer: bool,
        user_metadata: Mapping[str, str],
        save_name: str,
    ) -> RestoreResult: ...


class Checkpoints:
    """Picks and proves the checkpoint an attempt hands off; owned by the executor."""

    def __init__(
        self,
        *,
        store: Store,
        gateway: Gateway,
        restorer: Restorer | None,
        ledger: Ledger,
        clock: Clock,
    ) -> None:
        self._store = store
        self._gateway = gateway
        self._restorer = restorer
        self._ledger = ledger
        self._clock = clock

    async def prepare(
        self,
        tracked: Tracked,
        lineage: Lineage,
        run: RunView,
        earlier: Sequence[Attempt],
        override: str | None,
        tags: Mapping[str, str],
    ) -> tuple[CheckpointView, str, str | None]:
        """Select, protect and (restore: sdk) prove a checkpoint. Returns it, the path to hand
        off and the restored run, if any. A checkpoint the service refuses to restore is marked
        bad and the next one is selected, until one restores or none is left."""
        rule = tracked.rule
        while True:
            await self._ledger.record(
                tracked, AttemptStep.SELECTING, "ranking candidate checkpoints"
            )
            if override is not None:
                chosen = await self._chosen_by_operator(tracked, run, override)
            else:
                chosen = await self._select(tracked, lineage, run, earlier)
            found: dict[str, Any] = {
                "checkpoint_path": chosen.tinker_path,
                "checkpoint_time": chosen.time,
            }
            if rule.restore != "sdk":
                await self._protect(tracked, chosen, **found)
                return chosen, chosen.tinker_path, None
            copy = await self._proven_copy(chosen, earlier)
            if copy is not None:
                # One proven copy per checkpoint per lineage: a retry reuses it instead of
                # making (and paying for) another restored run.
                await self._protect(tracked, chosen, **found)
                return chosen, copy, ranking.run_id_of(copy)
            await self._ledger.record(
                tracked, AttemptStep.RESTORING, "restoring with the SDK", **found
            )
            result = await self._restore(tracked, chosen, tags)
            if result is not None:
                # Protected only once the restore proved it: an unloadable checkpoint keeps its
                # TTL. It was checked to outlive min_ttl, which covers the restore's seconds.
                await self._protect(tracked, chosen, **found)
                return chosen, result.saved_path, result.new_run_id
            if override is not None:  # the operator's choice failed; there is no fallback
                raise AttemptFinished(
                    AttemptOutcome.FAILED, f"requested checkpoint {override} could not be restored"
                )

    async def _proven_copy(self, chosen: CheckpointView, earlier: Sequence[Attempt]) -> str | None:
        """The `restore: sdk` copy an earlier attempt of this lineage made of `chosen`, if one
        did and the copy was not found bad since."""
        copies = [
            a.handed_off_path
            for a in reversed(earlier)
            if a.checkpoint_path == chosen.tinker_path
            and a.handed_off_path is not None
            and a.handed_off_path != chosen.tinker_path
        ]
        if not copies:
            return None
        bad = await self._store.bad_checkpoints(copies)
        return next((path for path in copies if path not in bad), None)

    async def _select(
        self, tracked: Tracked, lineage: Lineage, run: RunView, earlier: Sequence[Attempt]
    ) -> CheckpointView:
        cfg = tracked.rule.checkpoint
        candidates = await self._candidates(lineage, run, earlier)
        bad = await self._store.bad_checkpoints([c.tinker_path for c in candidates])
        ranked = ranking.rank_checkpoints(candidates, now=self._clock.now(), cfg=cfg, bad=bad)
        for checkpoint in ranked:
            try:
                info = await self._gateway.weights_info(checkpoint.tinker_path)
            except RemoteUnavailable as exc:
                # Could not check is not bad: end this attempt and let the backoff retry later.
                raise AttemptFinished(
                    AttemptOutcome.FAILED, f"weights_info unavailable: {exc}"
                ) from exc
            except RemoteRejected as exc:
                if not _is_verdict_on_checkpoint(exc):
                    # 401/403, an unexpected 4xx or a malformed 200 says nothing about this
                    # checkpoint: marking it bad would lose it forever. Fail; retry later.
                    raise AttemptFinished(
                        AttemptOutcome.FAILED, f"weights_info refused: {exc}"
                    ) from exc
                await self._ledger.reject(
                    tracked, checkpoint, ranking.RejectionReason.UNLOADABLE, exc
                )
                continue
            reason = ranking.rejection_reason(run, info, restore_optimizer=cfg.restore_optimizer)
            if reason is None:
                return checkpoint
            await self._ledger.reject(tracked, checkpoint, reason, None)
        raise AttemptFinished(
            AttemptOutcome.FAILED,
            f"no usable checkpoint ({len(candidates)} found, {len(ranked)} eligible)",
        )

    async def _chosen_by_operator(
        self, tracked: Tracked, run: RunView, tinker_path: str
    ) -> CheckpointView:
        """The operator's checkpoint, with its listed metadata when its run still lists it."""
        owner = ranking.run_id_of(tinker_path)
        if owner is None:
            raise AttemptFinished(AttemptOutcome.FAILED, f"not a tinker path: {tinker_path!r}")
        try:
            listed = await self._gateway.list_checkpoints(owner)
            info = await self._gateway.weights_info(tinker_path)
        except (RemoteUnavailable, RemoteRejected) as exc:
            raise AttemptFinished(
                AttemptOutcome.FAILED, f"requested checkpoint {tinker_path} unusable: {exc}"
            ) from exc
        chosen = next((c for c in listed if c.tinker_path == tinker_path), None)
        if chosen is None:
            raise AttemptFinished(
                AttemptOutcome.FAILED, f"requested checkpoint {tinker_path} is not listed"
            )
        cfg = tracked.rule.checkpoint
        reason = ranking.rejection_reason(run, info, restore_optimizer=cfg.restore_optimizer)
        if reason is not None:
            raise AttemptFinished(
                AttemptOutcome.FAILED, f"requested checkpoint {tinker_path}: {reason.value}"
            )
        return chosen

    async def _candidates(
        self, lineage: Lineage, run: RunView, earlier: Sequence[Attempt]
    ) -> list[CheckpointView]:
        found = await self._listed(run.run_id)
        if run.last_checkpoint is not None:
            found.append(run.last_checkpoint)
        # Fallbacks: checkpoints of the lineage's earlier runs, newest attempt first, and of the
        # runs earlier attempts handed off to: a successor that ran for a while before it died
        # saved newer checkpoints than the one it started from, and a retry must not roll the
        # job back past them. Ranking orders them all by time.
        earlier_runs: list[str] = []
        for a in reversed(earlier):
            if a.successor_run_id is not None:
                earlier_runs.append(a.successor_run_id)
            earlier_runs.append(a.corrupted_run_id)
        earlier_runs.append(lineage.root_run_id)
        fallbacks = [r for r in dict.fromkeys(earlier_runs) if r != run.run_id]
        for other in fallbacks[:_MAX_EARLIER_RUNS]:
            found.extend(await self._listed(other))
        return found

    async def _listed(self, run_id: str) -> list[CheckpointView]:
        """The run's checkpoints; none only when the service says the run is gone (404/410).

        Any other trouble (unavailable, 401/403, a malformed answer) fails the attempt: read as
        "no checkpoints", it would hand off an older checkpoint than the run really has."""
        try:
            return list(await self._gateway.list_checkpoints(run_id))
        except RemoteUnavailable as exc:
            raise AttemptFinished(
                AttemptOutcome.FAILED, f"list_checkpoints unavailable: {exc}"
            ) from exc
        except RemoteRejected as exc:
            if exc.status_code not in _RUN_GONE:
                raise AttemptFinished(
                    AttemptOutcome.FAILED, f"list_checkpoints refused: {exc}"
                ) from exc
            # The run (an old one, or the corrupted one) is gone, its checkpoints with it.
            log.info("checkpoints_unlisted", run_id=run_id, reason=str(exc))
            return []

    async def _protect(self, tracked: Tracked, chosen: CheckpointView, **found: Any) -> None:
        """Extend the chosen checkpoint's TTL to the rule's protect_ttl, if it sets one."""
        if tracked.rule.checkpoint.protect_ttl is None:
            return
        ttl_s = int(tracked.rule.checkpoint.protect_ttl)
        tinker_path = chosen.tinker_path
        await self._ledger.record(tracked, AttemptStep.PROTECTING, f"ttl {ttl_s}s", **found)
        try:
            await self._gateway.set_checkpoint_ttl(tinker_path, ttl_s)
        except (RemoteUnavailable, RemoteRejected) as exc:
            # The checkpoint was just checked to outlive min_ttl; protection is a bonus.
            log.warning(
                "checkpoint_protect_failed",
                lineage_id=tracked.attempt.lineage_id,
                attempt_id=tracked.attempt.attempt_id,
                step=tracked.attempt.step.value,
                checkpoint_path=tinker_path,
                reason=str(exc),
            )

    async def _restore(
        self, tracked: Tracked, checkpoint: CheckpointView, tags: Mapping[str, str]
    ) -> RestoreResult | None:
        """The restored run, or None when the service refused this checkpoint (now marked bad,
        so the next selection falls back to an older one)."""
        if self._restorer is None:
            raise AttemptFinished(AttemptOutcome.FAILED, "restore: sdk but no restorer configured")
        try:
            return await self._restorer.restore(
                checkpoint.tinker_path,
                with_optimizer=tracked.rule.checkpoint.restore_optimizer,
                user_metadata=tags,
                # Named after its source, so the job (and an operator) can tell which
                # checkpoint a proven copy came from: "000040-recovery-2".
                save_name=f"{checkpoint.checkpoint_id.rsplit('/', 1)[-1]}-recovery-"
                f"{tracked.attempt.number}",
            )
        except ActionFailed as exc:
            if not exc.checkpoint_at_fault:
                raise AttemptFinished(AttemptOutcome.FAILED, f"restore failed: {exc}") from exc
            await self._ledger.reject(tracked, checkpoint, ranking.RejectionReason.UNLOADABLE, exc)
            return None
