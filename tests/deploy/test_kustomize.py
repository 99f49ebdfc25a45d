"""Every kustomization under deploy/kubernetes/ builds with the real kustomize and validates.

The overlay used to sit inside its base (`ha/` under the base directory), which kustomize
refuses as a cycle; only a build with the real tool shows that, so this test runs it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
from kustomize_build import KUBERNETES, build, kustomizations

SERVICEMONITOR_SCHEMA = Path(__file__).with_name("servicemonitor.schema.json")
VERSIONS = ["1.31.0", kubernetes_validate.latest_version()]
NAMESPACE = "tinker-recovery"
CLUSTER_SCOPED = {"Namespace"}


def _relative(directory: Path) -> str:
    return str(directory.relative_to(KUBERNETES))


def test_the_layout_is_a_base_and_overlays_beside_it() -> None:
    assert [_relative(d) for d in kustomizations()] == ["base", "overlays/ha"]
    # An overlay inside its base is a kustomize cycle; none may nest in another.
    for outer in kustomizations():
        for inner in kustomizations():
            assert inner == outer or outer not in inner.parents, (outer, inner)


@pytest.mark.parametrize("directory", kustomizations(), ids=_relative)
def test_kustomization_builds_and_every_object_validates(directory: Path) -> None:
    docs = build(directory)
    kinds = {doc["kind"] for doc in docs}
    assert {"Namespace", "Deployment", "ConfigMap", "Service", "ServiceMonitor"} <= kinds
    monitor_schema = json.loads(SERVICEMONITOR_SCHEMA.read_text(encoding="utf-8"))
    for doc in docs:
        if doc["kind"] == "ServiceMonitor":  # a CRD: checked against its documented schema
            jsonschema.validate(doc, monitor_schema)
            continue
        for version in VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("directory", kustomizations(), ids=_relative)
def test_every_namespaced_object_lands_in_the_namespace(directory: Path) -> None:
    for doc in build(directory):
        metadata: dict[str, Any] = doc["metadata"]
        if doc["kind"] in CLUSTER_SCOPED:
            assert metadata["name"] == NAMESPACE
        else:
            assert metadata.get("namespace") == NAMESPACE, (doc["kind"], metadata["name"])
        assert metadata["labels"]["app.kubernetes.io/name"] == "tinker-recovery"


def test_the_ha_overlay_changes_what_it_says_and_nothing_else() -> None:
    base = {(d["kind"], d["metadata"]["name"]): d for d in build(KUBERNETES / "base")}
    ha = {(d["kind"], d["metadata"]["name"]): d for d in build(KUBERNETES / "overlays" / "ha")}
    assert set(base) - set(ha) == {("PersistentVolumeClaim", "tinker-recovery-state")}
    assert set(ha) <= set(base)
    changed = {key for key in ha if ha[key] != base[key]}
    assert changed == {("Deployment", "tinker-recovery")}
