"""Build a kustomization with the real `kubectl kustomize` (kustomize v5 is built in).

Shared by tests/deploy/test_kustomize.py and tests/ha/test_kubernetes_overlay.py. A missing
kubectl is a failure that says so, never a skip: `make test` must prove the manifests build.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
KUBERNETES = REPO / "deploy" / "kubernetes"


def kustomizations() -> list[Path]:
    """Every directory under deploy/kubernetes/ that holds a kustomization."""
    return sorted(path.parent for path in KUBERNETES.rglob("kustomization.yaml"))


def build(directory: Path) -> list[dict[str, Any]]:
    """The documents `kubectl kustomize directory` renders, or a test failure with its stderr."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail(
            "kubectl not found on PATH: the Kubernetes manifests are built with the real "
            "`kubectl kustomize` (kustomize v5). Install kubectl >= 1.27 and rerun."
        )
    result = subprocess.run(
        [kubectl, "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(f"kubectl kustomize {directory} failed:\n{result.stderr}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]
