"""The image's entry point, user and read-only layout, replayed outside a container.

No container engine runs here, so the Dockerfile is parsed and its final stage replayed on the
host: a temporary directory plays the image's root filesystem, every image path is mapped into
it (the venv to this venv), the child gets exactly the image's ENV, WORKDIR and numeric USER
(when the tests run as root), and everything but the state volume and /tmp is made read-only.
Then the exact ENTRYPOINT + CMD argv runs (minus tini, which only forwards signals and reaps):
once as `check-config`, once as the real `run` until READY=1, the HEALTHCHECK and SIGTERM.
"""

from __future__ import annotations

import fnmatch
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import daemon_proc
import image_spec
import pytest
from deploy_paths import REPO, find_tool

SPEC = image_spec.load()
FAKE_KEY = "tml-container-layout-not-a-real-key"
KEY_PATH = "/run/secrets/tinker_api_key"


@dataclass
class ImageRoot:
    """A fake root filesystem laid out like the image, plus how to map paths into it."""

    root: Path
    venv: Path

    def remap(self, text: str) -> str:
        """Rewrite image paths in argv, env values and config text to paths under `root`.

        One pass, anchored at the start of a path: a substituted path (the fake root and the
        host venv may both live under /tmp) is never rewritten a second time."""
        prefixes = ("/opt/venv", "/etc/tinker-recovery", "/run/secrets", *SPEC.volumes, "/tmp")
        alternatives = "|".join(re.escape(p) for p in sorted(prefixes, key=len, reverse=True))
        pattern = re.compile(rf"(?<![\w.-])(?:{alternatives})(?![\w.-])")

        def into_root(found: re.Match[str]) -> str:
            prefix = found.group(0)
            return str(self.venv) if prefix == "/opt/venv" else f"{self.root}{prefix}"

        return pattern.sub(into_root, text)

    def path(self, image_path: str) -> Path:
        return Path(self.remap(image_path))

    def env(self, **overrides: str) -> dict[str, str]:
        env = {key: self.remap(value) for key, value in SPEC.env.items()}
        env.update(overrides)
        return env

    def snapshot(self) -> dict[str, float]:
        """Every file and directory outside the writable places, with its mtime."""
        writable = [self.path(p) for p in (*SPEC.volumes, "/tmp")]
        found: dict[str, float] = {}
        for dirpath, dirnames, filenames in os.walk(self.root):
            here = Path(dirpath)
            if any(here == w or w in here.parents for w in writable):
                continue
            for name in [*dirnames, *filenames]:
                if here / name not in writable:  # their contents may change, by design
                    found[str(here / name)] = (here / name).lstat().st_mtime
        return found


def _others_can_use(path: Path) -> bool:
    """Whether a user who is neither owner nor in the group may reach and execute `path`."""
    real = path.resolve()
    return all(os.stat(p).st_mode & stat.S_IXOTH for p in [real, *real.parents])


def _image_user() -> int | None:
    """Run the child as the image's numeric user, like the container, when that is possible:
    we must be root, and the host interpreter must be reachable by others (a pyenv Python
    under /root is not). Otherwise the snapshot comparison alone guards the read-only root."""
    if os.geteuid() != 0 or not _others_can_use(Path(sys.executable)):
        return None
    return SPEC.uid


@pytest.fixture
def image_root() -> Iterator[ImageRoot]:
    # Not tmp_path: pytest's base directory is private to root, and the child may run as 10001.
    with tempfile.TemporaryDirectory(prefix="image-root-") as name:
        root = Path(name)
        root.chmod(0o755)
        layout = ImageRoot(root=root, venv=Path(sys.prefix))
        for copy in SPEC.copies:
            if copy.from_stage is None:
                (source,) = copy.sources
                target = layout.path(copy.dest)
                target.parent.mkdir(parents=True, exist_ok=True)
                text = (REPO / source).read_text(encoding="utf-8")
                target.write_text(layout.remap(text), encoding="utf-8")
        key = layout.path(KEY_PATH)
        key.parent.mkdir(parents=True)
        key.write_text(FAKE_KEY + "\n", encoding="utf-8")
        key.chmod(0o444)
        for writable in (*SPEC.volumes, "/tmp"):
            folder = layout.path(writable)
            folder.mkdir(parents=True, exist_ok=True)
            if os.geteuid() == 0:
                os.chown(folder, SPEC.uid, SPEC.uid)
            folder.chmod(0o1777 if writable == "/tmp" else 0o750)
        for dirpath, _, _ in os.walk(root):
            here = Path(dirpath)
            if not any(
                here == layout.path(w) or layout.path(w) in here.parents
                for w in (*SPEC.volumes, "/tmp")
            ):
                here.chmod(0o555)  # read-only root filesystem, for a non-root child at least
        yield layout
        for dirpath, _, _ in os.walk(root):
            Path(dirpath).chmod(0o755)  # let the cleanup delete it


def _argv(layout: ImageRoot, cmd: tuple[str, ...]) -> list[str]:
    assert SPEC.entrypoint[:2] == ("/usr/bin/tini", "--")
    return [layout.remap(part) for part in (*SPEC.entrypoint[2:], *cmd)]


def test_image_facts() -> None:
    assert len(set(SPEC.base_images)) == 1, "build and runtime stages must share the base"
    assert SPEC.base_images[0].startswith("python:3.11-slim")
    assert SPEC.uid >= 10000, "fixed numeric non-root user"
    assert SPEC.entrypoint[:2] == ("/usr/bin/tini", "--")
    assert any("tini" in run and "apt-get install" in run for run in SPEC.runs)
    assert SPEC.env["PYTHONUNBUFFERED"] == SPEC.env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert SPEC.env["STATE_DIRECTORY"] in SPEC.volumes
    assert SPEC.workdir in SPEC.volumes  # a relative write lands on the volume, not the root
    assert SPEC.env["HOME"].startswith("/tmp")
    assert SPEC.cmd[:2] == ("run", "--config")
    (config_copy,) = [c for c in SPEC.copies if c.dest == SPEC.cmd[2]]
    assert (REPO / config_copy.sources[0]).is_file()


def test_everything_the_build_copies_exists() -> None:
    # `docker build` fails on a missing COPY source; nothing else would notice here.
    missing = [s for s in image_spec.context_sources() if not (REPO / s).exists()]
    assert not missing


def test_healthcheck_uses_python_on_healthz() -> None:
    argv = SPEC.healthcheck
    assert argv[:2] == ("python", "-c")
    assert "urllib.request" in argv[2]
    assert f"127.0.0.1:{SPEC.expose[0]}/healthz" in argv[2]
    assert not {"curl", "wget"} & set(" ".join(argv).split())


def test_hadolint_reports_nothing() -> None:
    result = subprocess.run(
        [find_tool("hadolint"), str(image_spec.DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_hadolint_would_catch_an_unpinned_package(tmp_path: Path) -> None:
    text = image_spec.DOCKERFILE.read_text(encoding="utf-8")
    broken = text.replace("tini=0.19.0-1", "tini")
    assert broken != text
    (tmp_path / "Dockerfile").write_text(broken, encoding="utf-8")
    result = subprocess.run(
        [find_tool("hadolint"), str(tmp_path / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "DL3008" in result.stdout


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern.removeprefix("!").strip("/")
        if any(fnmatch.fnmatchcase(prefix, body) for prefix in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_sends_what_the_build_copies_and_nothing_heavy() -> None:
    lines = (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
    patterns = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
    for source in image_spec.context_sources():
        assert not _ignored(source, patterns), source
    assert not _ignored("daemon/tinker_recovery/__init__.py", patterns)
    for heavy in [".venv/bin/python", ".git/HEAD", ".tools/bin/promtool", "tests/conftest.py"]:
        assert _ignored(heavy, patterns), heavy


def test_check_config_through_the_image_entry_point(image_root: ImageRoot) -> None:
    before = image_root.snapshot()
    result = subprocess.run(
        _argv(image_root, ("check-config", *SPEC.cmd[1:])),
        env=image_root.env(),
        cwd=image_root.path(SPEC.workdir),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        user=_image_user(),
        group=_image_user(),
    )
    assert result.returncode == 0, result.stderr
    assert f"api_key_file: {image_root.path(KEY_PATH)}" in result.stdout
    volume = image_root.path(SPEC.volumes[0])
    assert f"url: sqlite:///{volume}/state.db" in result.stdout
    assert FAKE_KEY not in result.stdout + result.stderr
    assert image_root.snapshot() == before


@pytest.mark.slow
def test_run_through_the_image_entry_point(image_root: ImageRoot) -> None:
    # The operator-facing overrides a test needs: loopback only, a port of our own, and a
    # Tinker URL where nothing listens (polls fail; the daemon must still start and stop).
    port = daemon_proc.free_port()
    notify_path = image_root.path("/tmp") / "notify.sock"
    env = image_root.env(
        TINKER_RECOVERY_HTTP__HOST="127.0.0.1",
        TINKER_RECOVERY_HTTP__PORT=str(port),
        TINKER_RECOVERY_TINKER__BASE_URL=f"http://127.0.0.1:{daemon_proc.free_port()}",
        TINKER_TELEMETRY="0",
        NOTIFY_SOCKET=str(notify_path),
    )
    before = image_root.snapshot()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        notify_path.chmod(0o777)
        with subprocess.Popen(
            _argv(image_root, SPEC.cmd),
            env=env,
            cwd=image_root.path(SPEC.workdir),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            user=_image_user(),
            group=_image_user(),
        ) as proc:
            daemon_proc.wait_for(notify, b"READY=1", proc)
            health = [part.replace(f":{SPEC.expose[0]}/", f":{port}/") for part in SPEC.healthcheck]
            check = subprocess.run(
                [sys.executable, *health[1:]], capture_output=True, text=True, timeout=30
            )
            assert check.returncode == 0, check.stderr
            proc.send_signal(signal.SIGTERM)
            daemon_proc.wait_for(notify, b"STOPPING=1", proc)
            out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err[-2000:]
    assert FAKE_KEY not in out + err
    volume = image_root.path(SPEC.volumes[0])
    assert (volume / "state.db").exists()
    assert stat.S_IMODE(volume.stat().st_mode) == 0o750
    assert image_root.snapshot() == before
