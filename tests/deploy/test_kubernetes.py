"""deploy/kubernetes/base/: schema-valid offline, wired together, and within the restricted profile.

Core kinds are checked with kubernetes-validate's bundled schemas in strict mode (unknown
fields are errors). The ServiceMonitor is a CRD those schemas do not know: it is checked with
servicemonitor.schema.json, written from the CRD's documented fields.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import image_spec
import jsonschema
import kubernetes_validate
import pytest
import yaml
from deploy_paths import DEPLOY

from tinker_recovery.shell import config_loader

K8S = DEPLOY / "kubernetes" / "base"
SERVICEMONITOR_SCHEMA = Path(__file__).with_name("servicemonitor.schema.json")
# The oldest Kubernetes these manifests promise to work on (PDB unhealthyPodEvictionPolicy is
# GA in 1.31), and the newest schema the validator ships.
VERSIONS = ["1.31.0", kubernetes_validate.latest_version()]


def _kustomization() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))
    return doc


def _resources() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for name in _kustomization()["resources"]:
        docs.extend(d for d in yaml.safe_load_all((K8S / name).read_text(encoding="utf-8")) if d)
    return docs


def _one(kind: str) -> dict[str, Any]:
    (found,) = [doc for doc in _resources() if doc["kind"] == kind]
    return found


def _pod() -> dict[str, Any]:
    spec: dict[str, Any] = _one("Deployment")["spec"]["template"]["spec"]
    return spec


def _container() -> dict[str, Any]:
    (container,) = _pod()["containers"]
    assert isinstance(container, dict)
    return container


def test_kustomization_lists_every_manifest() -> None:
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(_kustomization()["resources"]) == on_disk


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(
    "doc",
    [d for d in _resources() if d["kind"] != "ServiceMonitor"],
    ids=lambda d: str(d["kind"]),
)
def test_core_resources_validate_strictly(doc: dict[str, Any], version: str) -> None:
    kubernetes_validate.validate(doc, version, strict=True)


def test_strict_validation_rejects_an_unknown_field() -> None:
    deployment = _one("Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)


def _servicemonitor_validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(SERVICEMONITOR_SCHEMA.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_servicemonitor_matches_its_crd_schema() -> None:
    _servicemonitor_validator().validate(_one("ServiceMonitor"))


@pytest.mark.parametrize(
    ("path", "bad"),
    [
        pytest.param(("endpoints", 0, "interval"), "30 seconds", id="bad-duration"),
        pytest.param(("endpoints", 0, "prot"), "http", id="unknown-endpoint-field"),
        pytest.param(("selectr",), {}, id="unknown-spec-field"),
    ],
)
def test_servicemonitor_schema_rejects_mistakes(path: tuple[str | int, ...], bad: object) -> None:
    monitor = _one("ServiceMonitor")
    target: Any = monitor["spec"]
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = bad
    with pytest.raises(jsonschema.ValidationError):
        _servicemonitor_validator().validate(monitor)


def test_one_replica_recreated_never_two_at_once() -> None:
    spec = _one("Deployment")["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}


def test_probes_use_healthz_and_readyz() -> None:
    container = _container()
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    (port,) = container["ports"]
    assert container["livenessProbe"]["httpGet"]["port"] == port["name"]


def test_security_context_is_restricted() -> None:
    pod, container = _pod(), _container()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    ctx = container["securityContext"]
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["capabilities"] == {"drop": ["ALL"]}
    assert pod["automountServiceAccountToken"] is False
    # Volume types the restricted Pod Security Standard allows.
    allowed = {"configMap", "secret", "emptyDir", "persistentVolumeClaim", "projected"}
    for volume in pod["volumes"]:
        assert set(volume) - {"name"} <= allowed, volume["name"]
    namespace = _one("Namespace")["metadata"]["labels"]
    assert namespace["pod-security.kubernetes.io/enforce"] == "restricted"


def test_pod_matches_the_image() -> None:
    image = image_spec.load()
    pod, container = _pod(), _container()
    assert pod["securityContext"]["runAsUser"] == image.uid
    assert tuple(container["args"]) == image.cmd
    assert "command" not in container  # keep the image's tini entry point
    assert [p["containerPort"] for p in container["ports"]] == list(image.expose)


def test_only_the_volume_and_tmp_are_writable() -> None:
    mounts = {m["mountPath"]: m for m in _container()["volumeMounts"]}
    writable = {path for path, m in mounts.items() if not m.get("readOnly", False)}
    assert writable == {*image_spec.load().volumes, "/tmp"}


def test_secret_is_referenced_not_shipped() -> None:
    assert not [doc for doc in _resources() if doc["kind"] == "Secret"]
    (volume,) = [v for v in _pod()["volumes"] if "secret" in v]
    assert volume["secret"]["secretName"] == "tinker-recovery-api-key"


def test_configmap_is_a_valid_config_using_the_mounts(tmp_path: Path) -> None:
    text = _one("ConfigMap")["data"]["config.yaml"]
    (tmp_path / "config.yaml").write_text(text, encoding="utf-8")
    settings = config_loader.load_settings(tmp_path / "config.yaml", env={})
    mounts = {m["name"]: m["mountPath"] for m in _container()["volumeMounts"]}
    (secret_volume,) = [v for v in _pod()["volumes"] if "secret" in v]
    (item,) = secret_volume["secret"]["items"]
    assert str(settings.tinker.api_key_file) == f"{mounts[secret_volume['name']]}/{item['path']}"
    assert settings.state.url == f"sqlite:///{mounts['state']}/state.db"
    assert settings.http.host == "0.0.0.0"
    assert settings.http.port == _container()["ports"][0]["containerPort"]


def test_selectors_connect_service_monitor_and_budget_to_the_pod() -> None:
    pod_labels = _one("Deployment")["spec"]["template"]["metadata"]["labels"]
    service = _one("Service")
    for selector in (
        service["spec"]["selector"],
        _one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
        _one("Deployment")["spec"]["selector"]["matchLabels"],
    ):
        assert selector.items() <= pod_labels.items()
    monitor = _one("ServiceMonitor")["spec"]
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    service_ports = {p["name"] for p in service["spec"]["ports"]}
    assert {e["port"] for e in monitor["endpoints"]} <= service_ports


def test_configmap_carries_the_image_default_config() -> None:
    # Two copies of one config: the image's default and the ConfigMap mounted over it.
    (copy,) = [c for c in image_spec.load().copies if c.dest.endswith("config.yaml")]
    image_default = yaml.safe_load((DEPLOY.parent / copy.sources[0]).read_text(encoding="utf-8"))
    assert yaml.safe_load(_one("ConfigMap")["data"]["config.yaml"]) == image_default
