"""Configuration: pydantic-settings models, one small group per concern.

Sources, first wins: init kwargs, environment (`TINKER_RECOVERY_<SECTION>__<KEY>`), secrets
directory (systemd credentials), the YAML file. Every model forbids unknown keys. Durations are
written `30s`, `5m`, `24h` (or plain seconds) and held as float seconds.
Locating a bad value at `file:line:col` is done by `shell/config_loader.py`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration_s(value: object) -> float:
    """`30s`, `5m`, `24h`, `1.5s`, `250ms` or a number of seconds -> float seconds."""
    if isinstance(value, bool):
        raise ValueError("a duration must be like 30s, 5m or 24h, not a boolean")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _UNIT_S[m.group(2)]
    else:
        raise ValueError(f"a duration must be like 30s, 5m or 24h, got {value!r}")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


def format_duration(seconds: float) -> str:
    """The inverse of parse_duration_s, in the largest unit that is exact: 1d, 15m, 30s, 250ms."""
    for unit in ("d", "h", "m", "s"):
        count = seconds / _UNIT_S[unit]
        if count >= 1 and count == int(count):
            return f"{int(count)}{unit}"
    millis = seconds * 1000
    if 0 < seconds < 1 and millis == int(millis):
        return f"{int(millis)}ms"
    return f"{seconds:g}s"


Duration = Annotated[float, BeforeValidator(parse_duration_s)]


def _positive(value: float) -> float:
    if value <= 0:
        raise ValueError("must be greater than zero")
    return value


PositiveDuration = Annotated[Duration, AfterValidator(_positive)]


class _Group(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TinkerSettings(_Group):
    base_url: str = Field(
        "http://127.0.0.1:8765",
        description="API root; endpoints are <base_url>/api/v1/... (TINKER_BASE_URL also works)",
    )
    api_key: SecretStr | None = Field(
        None, description="API key; prefer TINKER_API_KEY, api_key_file or systemd credentials"
    )
    api_key_file: Path | None = Field(None, description="file holding the API key")
    access_scope: Literal["owned", "accessible"] = Field(
        "owned", description="which runs to watch: those the key owns, or all it can access"
    )
    project_id: str | None = Field(None, description="only watch runs of this project")
    request_timeout: PositiveDuration = Field(10.0, description="deadline for one HTTP request")
    page_size: int = Field(100, ge=1, le=1000, description="runs asked for per page")
    max_concurrent_pages: int = Field(8, ge=1, le=64, description="pages fetched at once")
    retry_attempts: int = Field(3, ge=1, le=10, description="tries per request, first included")
    retry_base_delay: Duration = Field(0.2, description="first retry delay (full jitter)")
    retry_max_delay: Duration = Field(5.0, description="cap on one retry delay and Retry-After")
    restore_timeout: PositiveDuration = Field(
        300.0, description="deadline for one SDK restore (load + save_state)"
    )


class PollSettings(_Group):
    interval: PositiveDuration = Field(30.0, description="time between poll cycles")
    cycle_timeout: PositiveDuration = Field(
        60.0, description="a cycle that takes longer is abandoned and counted as failed"
    )


class StateSettings(_Group):
    url: str | None = Field(
        None,
        description="sqlite:///PATH or postgresql://...; default "
        "$STATE_DIRECTORY/state.db under systemd, else ./state.db",
    )
    lease_ttl: PositiveDuration = Field(
        15.0, description="PostgreSQL leader lease; a standby takes over after it expires"
    )
    lease_renew_interval: PositiveDuration = Field(5.0, description="how often the leader renews")
    replica_id: str | None = Field(None, description="this replica's name; default host:pid")
    events_max_age: PositiveDuration = Field(
        180 * 86400.0,
        description="events older than this are deleted, except those of lineages still open",
    )
    events_max_rows: int = Field(
        2_000_000,
        ge=1000,
        description="at most this many events are kept (oldest first go; open lineages' stay)",
    )
    compact_interval: PositiveDuration = Field(
        3600.0, description="how often the leader applies the event retention"
    )


class Match(_Group):
    """All given fields must match; an empty match matches every run."""

    run_id: str | None = Field(None, description="glob on the run id")
    base_model: str | None = Field(None, description="glob on the base model")
    is_lora: bool | None = Field(None, description="LoRA runs only (true) or full only (false)")
    owner: str | None = Field(None, description="glob on the model owner")
    labels: dict[str, str] = Field(
        default_factory=dict,
        description="user_metadata selectors: key -> glob; a key '!k' means k must be absent",
    )


class BackoffSettings(_Group):
    base: Duration = Field(30.0, description="delay before the second attempt")
    factor: float = Field(2.0, ge=1.0, description="growth per attempt")
    cap: Duration = Field(600.0, description="no delay is longer than this")


class CheckpointSettings(_Group):
    min_ttl: Duration = Field(600.0, description="skip checkpoints that expire sooner than this")
    max_age: Duration | None = Field(None, description="skip checkpoints older than this")
    restore_optimizer: bool = Field(True, description="resume with optimizer state")
    protect_ttl: Duration | None = Field(
        86400.0, description="extend the chosen checkpoint's TTL to this (null: leave it)"
    )


MIN_CHECKPOINT_TTL_S = 3600.0  # the service refuses a checkpoint ttl_seconds below this


class GuardSettings(_Group):
    """Checkpoint guard: keep a driven run's newest training checkpoint from expiring."""

    enabled: bool = Field(True, description="guard runs this rule recovers (recover rules only)")
    min_remaining: PositiveDuration = Field(
        2 * 86400.0, description="extend a checkpoint once it would expire within this"
    )
    extend_to: PositiveDuration = Field(
        7 * 86400.0,
        description="the new TTL, from now (at least 1h, the service's minimum, and longer "
        "than min_remaining; a longer TTL is never shortened)",
    )
    max_per_cycle: int = Field(
        20, ge=1, description="TTL calls per poll cycle for this rule; the rest wait a cycle"
    )
    driven_within: PositiveDuration | None = Field(
        None,
        description="a run that sent a request within this is driven (null: the rule's "
        "max_idle, or 1d when that is null)",
    )

    @model_validator(mode="after")
    def _bounded(self) -> GuardSettings:
        if self.extend_to < MIN_CHECKPOINT_TTL_S:
            raise ValueError("extend_to must be at least 1h (the service refuses shorter TTLs)")
        if self.extend_to <= self.min_remaining:
            raise ValueError("extend_to must be longer than min_remaining")
        return self


class Rule(_Group):
    name: str = Field(description="shown in decisions, logs and /status")
    match: Match = Field(default_factory=Match)
    action: Literal["recover", "alert", "ignore"] = "recover"
    priority: int = Field(0, description="higher goes first when the breaker staggers")
    max_attempts: int = Field(3, ge=1, description="attempts without progress within window")
    window: PositiveDuration = Field(86400.0, description="budget window")
    backoff: BackoffSettings = Field(default_factory=BackoffSettings)
    max_idle: Duration | None = Field(
        86400.0, description="skip runs nobody drove for this long before the corruption"
    )
    recover_preexisting: bool = Field(
        False, description="recover runs already corrupted when first seen"
    )
    checkpoint: CheckpointSettings = Field(default_factory=CheckpointSettings)
    restore: Literal["none", "sdk"] = Field(
        "none", description="sdk: restore + save_state ourselves and hand off the fresh path"
    )
    handoff: str | None = Field(None, description="name of an entry under `handoffs`")
    confirm_deadline: PositiveDuration = Field(
        900.0, description="the successor must appear and progress within this"
    )
    successor_match: Literal["tags", "tags_or_match"] = Field(
        "tags_or_match",
        description="tags: a successor must carry the attempt's idempotency key; tags_or_match: "
        "when none does, exactly one new run with the corrupted run's owner, base model, LoRA "
        "rank and labels is the successor (several such runs: recorded and alerted, never "
        "guessed)",
    )
    handoff_grace: Duration = Field(
        30.0,
        description="after a failed handoff, watch this long for a successor it may have "
        "started anyway before failing the attempt (0: fail at once)",
    )
    guard: GuardSettings = Field(default_factory=GuardSettings)
    stall_after: PositiveDuration | None = Field(
        None,
        description="report the run stalled when it sends no request for this long and has "
        "no final checkpoint (null: never)",
    )
    on_stall: Literal["alert", "recover"] = Field(
        "alert", description="alert: report only; recover: also offer it to the policy"
    )


class BreakerSettings(_Group):
    threshold: int = Field(5, ge=1, description="more corruptions than this within window trip it")
    window: PositiveDuration = Field(300.0, description="window for counting corruptions")
    mode: Literal["stagger", "hold"] = "stagger"
    stagger_rate: int = Field(2, ge=1, description="restarts allowed per stagger_interval")
    stagger_interval: PositiveDuration = Field(60.0, description="stagger period")
    cool_down: PositiveDuration = Field(
        900.0, description="breaker closes after this long without new corruptions"
    )


class PolicySettings(_Group):
    dry_run: bool = Field(False, description="decide and record everything, act on nothing")
    confirmations: int = Field(2, ge=1, description="consecutive corrupted reads before acting")
    max_concurrent: int = Field(4, ge=1, description="attempts in flight at once, fleet-wide")
    breaker: BreakerSettings = Field(default_factory=BreakerSettings)
    rules: list[Rule] = Field(
        default_factory=lambda: [Rule(name="default")],
        description="ordered; first match wins; a run no rule matches is ignored",
    )


class CommandHandoff(_Group):
    type: Literal["command"]
    argv: list[str] = Field(
        min_length=1,
        description="argv, never a shell string; placeholders {lineage} {corrupted_run} "
        "{checkpoint} {attempt} {idempotency_key} {restore_optimizer}",
    )
    timeout: PositiveDuration = Field(60.0, description="the whole process group dies after this")
    env: dict[str, str] = Field(default_factory=dict, description="extra environment")
    cwd: Path | None = None


class WebhookHandoff(_Group):
    type: Literal["webhook"]
    url: str
    secret: SecretStr | None = Field(None, description="HMAC-SHA256 key for the signature header")
    timeout: PositiveDuration = 10.0
    max_attempts: int = Field(4, ge=1, le=20)


class PythonHandoff(_Group):
    type: Literal["python"]
    entry_point: str = Field(pattern=r"^[\w.]+:[\w.]+$", description="module:function")
    timeout: PositiveDuration = 60.0


Handoff = Annotated[CommandHandoff | WebhookHandoff | PythonHandoff, Field(discriminator="type")]


class HttpSettings(_Group):
    enabled: bool = True
    host: str = Field("127.0.0.1", description="bind address")
    port: int = Field(9464, ge=0, le=65535, description="0 picks a free port")
    token: SecretStr | None = Field(
        None, description="bearer token for mutating endpoints; they are off without it"
    )


class LogSettings(_Group):
    format: Literal["json", "console"] = "json"
    level: Literal["debug", "info", "warning", "error"] = "info"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="TINKER_RECOVERY_",
        env_nested_delimiter="__",
        frozen=True,
        extra="forbid",
        yaml_file=None,
    )

    tinker: TinkerSettings = Field(default_factory=TinkerSettings)
    poll: PollSettings = Field(default_factory=PollSettings)
    state: StateSettings = Field(default_factory=StateSettings)
    policy: PolicySettings = Field(default_factory=PolicySettings)
    handoffs: dict[str, Handoff] = Field(default_factory=dict)
    http: HttpSettings = Field(default_factory=HttpSettings)
    log: LogSettings = Field(default_factory=LogSettings)

    @model_validator(mode="after")
    def _handoffs_exist(self) -> Settings:
        names = [r.name for r in self.policy.rules]
        if len(set(names)) != len(names):
            raise ValueError("policy.rules: rule names must be unique")
        for rule in self.policy.rules:
            if rule.handoff is not None and rule.handoff not in self.handoffs:
                raise ValueError(
                    f"policy.rules[{rule.name}].handoff: no handoff named {rule.handoff!r}"
                )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        yaml_file = settings_cls.model_config.get("yaml_file")
        if yaml_file:
            sources.append(YamlConfigSettingsSource(settings_cls))
        return tuple(sources)


def load(path: Path | None, **overrides: Any) -> Settings:
    """Build Settings from a YAML file (None: embedded defaults) plus env and overrides.

    Raises pydantic.ValidationError / yaml.YAMLError; `shell/config_loader.py` turns those
    into located messages.
    """
    if path is None:
        return Settings(**overrides)

    class _FromFile(Settings):
        model_config = SettingsConfigDict(yaml_file=path)

    return _FromFile(**overrides)
