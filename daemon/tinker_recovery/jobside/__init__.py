"""The job's side of a recovery: for people who write their own training loop.

    from tinker_recovery import jobside

    handoff = jobside.current_handoff()          # None on a normal start
    client = jobside.create_training_client(
        service, base_model="Qwen/Qwen3-8B", rank=32, user_metadata={"team": "nlp"}
    ).result()

`create_training_client` resumes from the handed-off checkpoint (with optimizer state when
TINKER_RECOVERY_RESTORE_OPTIMIZER says so), else from `resume_from` (your own last checkpoint),
else creates a fresh LoRA client; in every case the run carries the attempt's
`tinker_recovery.*` metadata merged into yours, which is how the daemon recognises it. Jobs that
cannot be changed get the same through `tinker-recovery exec -- CMD...` (see docs/cookbook.md).

Stdlib only at import time: importing this from a job costs nothing and does not import the
daemon's dependencies. It must not import tinker_recovery.shell or app (an import contract).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tinker_recovery.jobside.attempt import Handoff, HandoffInvalid, from_environment

__all__ = [
    "Handoff",
    "HandoffInvalid",
    "create_training_client",
    "current_handoff",
    "merge_user_metadata",
]


def current_handoff(environ: Mapping[str, str] | None = None) -> Handoff | None:
    """The attempt this process was started for (TINKER_RECOVERY_*), or None.

    Raises HandoffInvalid when the variables are there but malformed.
    """
    return from_environment(environ)


def merge_user_metadata(
    own: Mapping[str, str] | None, handoff: Handoff | None = None
) -> dict[str, str]:
    """Your run metadata with the attempt's laid over it: your keys are kept, the attempt's
    `tinker_recovery.*` keys win. With no handoff (given or current), your keys unchanged."""
    handoff = current_handoff() if handoff is None else handoff
    merged = dict(own or {})
    if handoff is not None:
        for key, value in handoff.user_metadata.items():
            if key.startswith("tinker_recovery.") or key not in merged:
                merged[key] = value
    return merged


def create_training_client(
    service: Any,
    *,
    base_model: str | None = None,
    rank: int = 32,
    resume_from: str | None = None,
    user_metadata: Mapping[str, str] | None = None,
    handoff: Handoff | None = None,
    **lora_options: Any,
) -> Any:
    """A future of the training client this start should train with (call `.result()`).

    - handed off: from the attempt's checkpoint; with optimizer state unless the rule said
      `restore_optimizer: false`;
    - else `resume_from` given: from it, with optimizer state;
    - else a fresh LoRA client of `base_model` (`rank` and `lora_options` go to the SDK).
    `service` is a `tinker.ServiceClient`.
    """
    handoff = current_handoff() if handoff is None else handoff
    metadata = merge_user_metadata(user_metadata, handoff)
    if handoff is not None:
        if handoff.restore_optimizer:
            return service.create_training_client_from_state_with_optimizer(
                handoff.checkpoint_path, user_metadata=metadata
            )
        return service.create_training_client_from_state(
            handoff.checkpoint_path, user_metadata=metadata
        )
    if resume_from is not None:
        return service.create_training_client_from_state_with_optimizer(
            resume_from, user_metadata=metadata
        )
    if base_model is None:
        raise ValueError("no handoff and no resume_from: base_model is needed for a fresh run")
    return service.create_lora_training_client(
        base_model, rank, user_metadata=metadata, **lora_options
    )
