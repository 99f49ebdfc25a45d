"""The exception hierarchy. Library exceptions are translated into these once, at the edge."""

from __future__ import annotations


class RecoveryError(Exception):
    """Base for everything tinker-recovery raises on purpose."""


class RemoteUnavailable(RecoveryError):
    """Timeout, connection error, 5xx or 429: worth retrying later."""

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RemoteRejected(RecoveryError):
    """A 4xx answer or a malformed payload: retrying will not help."""

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class ActionFailed(RecoveryError):
    """A restore, TTL change or handoff did not succeed."""

    def __init__(
        self,
        message: str,
        *,
        action: str,
        exit_code: int | None = None,
        checkpoint_at_fault: bool = False,
        may_have_acted: bool = True,
    ) -> None:
        super().__init__(message)
        self.action = action
        self.exit_code = exit_code
        # False only when the action certainly did nothing outside (a command that could not be
        # started, a webhook the receiver refused outright). A handoff that failed any other way
        # may still have started the job, so the executor watches for its successor first.
        self.may_have_acted = may_have_acted
        # True when the service refused the checkpoint itself (a restore from it failed as a
        # user error): the next attempt must not pick it again.
        self.checkpoint_at_fault = checkpoint_at_fault


class ConfigError(RecoveryError):
    """The configuration is missing or invalid. Raised at start-up and on reload only."""


class FencedOut(RecoveryError):
    """A store write was refused because this replica no longer holds the leader lease."""


class StaleAttempt(FencedOut):
    """An attempt write was refused: the attempt is already finished in the store (another
    replica or an earlier term of ours settled it), so this writer's copy is out of date."""


class StoreUnavailable(RecoveryError):
    """The state store could not be opened or reached (file locked, database down, timeout)."""


class InconsistentListing(RemoteUnavailable):
    """Every page answered, but the pages do not add up to one fleet (a total_count that moved,
    a run id seen twice, a count that differs from the total), even after re-listing. The cycle
    is "unknown": such a listing is no evidence that a run is gone or never appeared."""
