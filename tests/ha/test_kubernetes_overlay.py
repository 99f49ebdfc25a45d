"""deploy/kubernetes/overlays/ha/: the base manifests plus two replicas on PostgreSQL state.

Rendered by the real `kubectl kustomize` (kustomize v5), as an operator's `kubectl apply -k`
would: an earlier version of this test applied the patches itself and so missed that the
overlay, then nested inside its base, could not be built at all (a kustomize cycle).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tinker_recovery.shell import config_loader

KUBERNETES = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
OVERLAY = KUBERNETES / "overlays" / "ha"
VERSIONS = ["1.31.0", kubernetes_validate.latest_version()]


def _render() -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl not found on PATH: the overlay is built with `kubectl kustomize`")
    result = subprocess.run(
        [kubectl, "kustomize", str(OVERLAY)], capture_output=True, text=True, timeout=60
    )
    if result.returncode != 0:
        pytest.fail(f"kubectl kustomize {OVERLAY} failed:\n{result.stderr}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def test_the_overlay_builds_on_the_base_beside_it() -> None:
    kustomization = yaml.safe_load((OVERLAY / "kustomization.yaml").read_text(encoding="utf-8"))
    assert kustomization["resources"] == ["../../base"]
    assert (OVERLAY / kustomization["resources"][0]).resolve() == KUBERNETES / "base"


def _deployment() -> dict[str, Any]:
    (found,) = [d for d in _render() if d["kind"] == "Deployment"]
    return found


def _env() -> dict[str, dict[str, Any]]:
    (container,) = _deployment()["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e for e in container["env"]}


@pytest.mark.parametrize("version", VERSIONS)
def test_rendered_overlay_validates_strictly(version: str) -> None:
    for doc in _render():
        if doc["kind"] != "ServiceMonitor":  # a CRD; tests/deploy checks it against its schema
            kubernetes_validate.validate(doc, version, strict=True)


def test_two_replicas_rolled_with_a_standby_always_up_on_different_nodes() -> None:
    spec = _deployment()["spec"]
    assert spec["replicas"] == 2
    assert spec["strategy"]["type"] == "RollingUpdate"
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    (spread,) = spec["template"]["spec"]["topologySpreadConstraints"]
    assert spread["topologyKey"] == "kubernetes.io/hostname"
    assert spread["whenUnsatisfiable"] == "DoNotSchedule"
    pod_labels = spec["template"]["metadata"]["labels"]
    assert spread["labelSelector"]["matchLabels"].items() <= pod_labels.items()


def test_no_shared_volume_and_every_mount_has_a_volume() -> None:
    docs = _render()
    assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    pod = _deployment()["spec"]["template"]["spec"]
    assert not [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
    volumes = {v["name"] for v in pod["volumes"]}
    (container,) = pod["containers"]
    assert {m["name"] for m in container["volumeMounts"]} <= volumes


def test_each_replica_has_its_own_name_and_the_password_stays_in_a_secret() -> None:
    env = _env()
    assert env["TINKER_RECOVERY_STATE__REPLICA_ID"]["valueFrom"]["fieldRef"] == {
        "fieldPath": "metadata.name"
    }
    url = env["TINKER_RECOVERY_STATE__URL"]["value"]
    assert url.startswith("postgresql://")
    assert ":" not in url.split("://", 1)[1].split("@", 1)[0], "no password in the URL"
    assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "tinker-recovery-postgres"
    assert not [d for d in _render() if d["kind"] == "Secret"]


def test_the_configmap_plus_the_overlay_env_selects_postgresql(tmp_path: Path) -> None:
    (configmap,) = [d for d in _render() if d["kind"] == "ConfigMap"]
    (tmp_path / "config.yaml").write_text(configmap["data"]["config.yaml"], encoding="utf-8")
    env = {name: e["value"] for name, e in _env().items() if "value" in e}
    env["TINKER_RECOVERY_STATE__REPLICA_ID"] = "tinker-recovery-7c9f-abcde"
    settings = config_loader.load_settings(tmp_path / "config.yaml", env=env)
    assert settings.state.url == env["TINKER_RECOVERY_STATE__URL"]
    assert settings.state.replica_id == "tinker-recovery-7c9f-abcde"
    assert settings.state.lease_ttl == 15.0
    assert settings.state.lease_renew_interval == 5.0
