"""open_store: which backend a state URL selects, and that bad URLs never echo a password."""

from __future__ import annotations

from pathlib import Path

import pytest
from store_helpers import FakeClock

from tinker_recovery.errors import ConfigError
from tinker_recovery.shell.store import PostgresStore, SqliteStore, open_store, redact_url


@pytest.mark.parametrize(
    ("url", "state_directory", "expected"),
    [
        pytest.param(None, None, Path("state.db"), id="default-cwd"),
        pytest.param(None, "/var/lib/tr", Path("/var/lib/tr/state.db"), id="systemd-dir"),
        pytest.param("", "/var/lib/tr", Path("/var/lib/tr/state.db"), id="empty-is-default"),
        pytest.param("sqlite:///srv/state/x.db", None, Path("/srv/state/x.db"), id="absolute"),
        pytest.param(
            "sqlite:////srv/state/x.db", None, Path("/srv/state/x.db"), id="absolute-4-slashes"
        ),
        pytest.param("sqlite:data/x.db", "/ignored", Path("data/x.db"), id="relative"),
        pytest.param("SQLITE:///a%20b.db", None, Path("/a b.db"), id="scheme-case-and-quoting"),
    ],
)
def test_sqlite_paths(url: str | None, state_directory: str | None, expected: Path) -> None:
    store = open_store(url, clock=FakeClock(), state_directory=state_directory)
    assert isinstance(store, SqliteStore)
    assert store.path == expected


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:pw@db.example:5432/state",
        "postgres://db.example/state?sslmode=require",
        "postgresql:///state?host=/run/postgresql",
    ],
)
def test_postgres_urls(url: str) -> None:
    assert isinstance(open_store(url, clock=FakeClock(), state_directory=None), PostgresStore)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        pytest.param(
            "mysql://root:hunter2@db/x", "unsupported state URL scheme 'mysql'", id="scheme"
        ),
        pytest.param("/var/lib/state.db", "needs a scheme", id="bare-path"),
        pytest.param("sqlite://host/x.db", "take no host", id="sqlite-host"),
        pytest.param("sqlite:", "names no database file", id="sqlite-empty"),
        pytest.param("sqlite:///var/lib/", "names no database file", id="sqlite-dir"),
        pytest.param("postgresql://u:hunter2@db:notaport/x", "invalid PostgreSQL", id="bad-port"),
        pytest.param(
            "postgresql://db/x?password=hunter2&bogus_param=1", "invalid PostgreSQL", id="bad-param"
        ),
    ],
)
def test_bad_urls_are_config_errors_without_the_password(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        open_store(url, clock=FakeClock(), state_directory=None)
    assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://u:hunter2@db:5432/x", "postgresql://u:***@db:5432/x"),
        (
            "postgresql://db/x?password=hunter2&sslmode=require",
            "postgresql://db/x?password=***&sslmode=require",
        ),
        ("postgresql://u@db/x", "postgresql://u@db/x"),
    ],
)
def test_redact_url_hides_passwords(url: str, shown: str) -> None:
    assert redact_url(url) == shown
