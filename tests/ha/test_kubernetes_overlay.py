"""deploy/kubernetes/ha/: the base manifests plus two replicas on PostgreSQL state.

No kustomize binary is needed: the overlay uses only the two patch forms this test applies
itself (a `$patch: delete` of a whole resource, and JSON patch operations add, replace and
test), so the rendered documents can be validated strictly like the base ones.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tinker_recovery.shell import config_loader

BASE = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
OVERLAY = BASE / "ha"
VERSIONS = ["1.31.0", kubernetes_validate.latest_version()]


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _base() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for name in _load(BASE / "kustomization.yaml")["resources"]:
        docs.extend(d for d in yaml.safe_load_all((BASE / name).read_text(encoding="utf-8")) if d)
    return docs


def _walk(doc: Any, path: str) -> tuple[Any, str]:
    """The container that holds the last segment of a JSON pointer, and that segment."""
    parts = [p.replace("~1", "/").replace("~0", "~") for p in path.split("/")[1:]]
    for part in parts[:-1]:
        doc = doc[int(part)] if isinstance(doc, list) else doc[part]
    return doc, parts[-1]


def _apply_op(doc: dict[str, Any], op: dict[str, Any]) -> None:
    parent, key = _walk(doc, op["path"])
    if op["op"] == "test":
        current = parent[int(key)] if isinstance(parent, list) else parent[key]
        assert current == op["value"], f"patch precondition failed at {op['path']}"
    elif op["op"] == "add" and isinstance(parent, list):
        parent.insert(len(parent) if key == "-" else int(key), copy.deepcopy(op["value"]))
    elif op["op"] in ("add", "replace"):
        if isinstance(parent, list):
            parent[int(key)] = copy.deepcopy(op["value"])
        else:
            assert op["op"] == "add" or key in parent, f"replace of a missing {op['path']}"
            parent[key] = copy.deepcopy(op["value"])
    else:
        raise AssertionError(f"unsupported patch operation {op['op']}")


def _render() -> list[dict[str, Any]]:
    kustomization = _load(OVERLAY / "kustomization.yaml")
    assert kustomization["resources"] == ["../"]
    docs = _base()
    for patch in kustomization["patches"]:
        body = yaml.safe_load(patch["patch"])
        if isinstance(body, dict) and body.get("$patch") == "delete":
            gone = (body["kind"], body["metadata"]["name"])
            assert gone in {(d["kind"], d["metadata"]["name"]) for d in docs}, gone
            docs = [d for d in docs if (d["kind"], d["metadata"]["name"]) != gone]
            continue
        target = patch["target"]
        (doc,) = [
            d
            for d in docs
            if d["kind"] == target["kind"] and d["metadata"]["name"] == target["name"]
        ]
        for op in body:
            _apply_op(doc, op)
    return docs


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
