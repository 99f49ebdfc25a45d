"""What a newcomer and an installer read: the license, how to install, how to run the CLI.

Checked against the files an operator follows step by step, so a recipe that leaks the API key
or points at a package index that has no such package fails here.
"""

from __future__ import annotations

import re
import tomllib

from deploy_paths import REPO

LICENSE = REPO / "LICENSE"
OPERATIONS = REPO / "docs" / "operations.md"
README = REPO / "README.md"


def test_license_file_is_the_apache_2_text_pyproject_declares() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["license"] == "Apache-2.0"
    text = LICENSE.read_text(encoding="utf-8")
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert len(text.splitlines()) > 150  # the full text, not a pointer to it


def test_install_instructions_build_a_wheel_from_the_source() -> None:
    text = OPERATIONS.read_text(encoding="utf-8")
    commands = "\n".join(line for line in text.splitlines() if line.startswith("    "))
    # Not on PyPI: a command installing it by name finds nothing.
    assert not re.search(r"pip install (--upgrade )?tinker-recovery\b", commands)
    assert "pip wheel --no-deps --no-build-isolation -w dist ." in text
    assert re.search(r"pip install \./tinker_recovery-[\w.]+-py3-none-any\.whl", text)


def test_the_container_recipe_never_makes_the_key_world_readable() -> None:
    text = OPERATIONS.read_text(encoding="utf-8")
    container = text[text.index("## Run as a container") : text.index("## Deploy on Kubernetes")]
    commands = [line.strip() for line in container.splitlines() if line.startswith("    ")]
    assert not [c for c in commands if re.search(r"chmod\s+0?[0-7][0-7][4-7]", c)], commands
    (install,) = [c for c in commands if "api_key" in c and c.startswith("sudo install")]
    assert "-o 10001" in install
    assert "-m 0400" in install


def test_readme_says_how_to_get_the_command_on_path_after_make_demo() -> None:
    text = README.read_text(encoding="utf-8")
    assert ".venv/bin/tinker-recovery" in text
    assert "source .venv/bin/activate" in text
