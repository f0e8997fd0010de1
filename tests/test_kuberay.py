"""deploy/kuberay/rayservice.yaml, checked without a Kubernetes cluster: against the RayService CRD's schema
(the part it uses, deploy/kuberay/rayservice.schema.yaml), its serveConfigV2 against Ray Serve's own config
schema and the application's arguments, and the memory version it names in both places it must be named."""

from __future__ import annotations

import copy
import importlib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.helpers import ROOT, unavailable

KUBERAY = ROOT / "deploy" / "kuberay"


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    schema = load(KUBERAY / "rayservice.schema.yaml")
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.fixture
def manifest() -> dict[str, Any]:
    return dict(load(KUBERAY / "rayservice.yaml"))


def errors(validator: jsonschema.Draft202012Validator, doc: dict[str, Any]) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def test_the_manifest_fits_the_rayservice_schema(validator: jsonschema.Draft202012Validator, manifest: dict) -> None:
    assert errors(validator, manifest) == []


@pytest.mark.parametrize(
    "path, value, why",
    [
        (("spec", "rayClusterConfig", "workerGroupSpec"), [], "Additional properties"),  # a typo
        (("spec", "rayClusterConfig", "workerGroupSpecs", 0, "replicas"), "3", "is not of type 'integer'"),
        (("spec", "upgradeStrategy", "type"), "Rolling", "is not one of"),
        (("spec", "rayClusterConfig", "headGroupSpec", "rayStartParams", "num-cpus"), 0, "is not of type 'string'"),
        (
            ("spec", "rayClusterConfig", "headGroupSpec", "template", "spec", "containers", 0, "resource"),
            {},
            "Additional",
        ),
    ],
)
def test_a_typo_or_a_wrong_type_fails(
    validator: jsonschema.Draft202012Validator, manifest: dict, path: tuple[Any, ...], value: object, why: str
) -> None:
    doc = copy.deepcopy(manifest)
    node: Any = doc
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value
    found = errors(validator, doc)
    assert found and any(why in e for e in found), found


def test_its_serve_config_passes_ray_serves_schema_and_the_applications_arguments(manifest: dict) -> None:
    try:
        from ray.serve.schema import ServeDeploySchema
    except ImportError:
        unavailable("the `ray` extra is not installed: pip install -e '.[ray]'", "RAC_REQUIRE_RAY")

    from service.cluster.app import RayConfig

    config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(config)
    local = load(ROOT / "deploy" / "ray" / "serve.yaml")
    assert config["http_options"] == {**local["http_options"], "host": "0.0.0.0"}  # reachable from the Service
    (app,) = config["applications"]
    assert app["import_path"] == local["applications"][0]["import_path"]
    module, name = app["import_path"].split(":")
    assert callable(getattr(importlib.import_module(module), name))
    args = RayConfig.model_validate(app["args"])
    assert set(args.settings) <= set(importlib.import_module("service.settings").Settings.model_fields)


def test_the_memory_version_is_named_where_a_switch_must_change_it(manifest: dict) -> None:
    """The shard directory's name and the pod templates' label: changing both makes KubeRay bring up a new
    cluster for the new version (a change under rayClusterConfig), instead of rolling the old one in place."""
    args = yaml.safe_load(manifest["spec"]["serveConfigV2"])["applications"][0]["args"]
    shards_dir = Path(args["shards_dir"])
    cluster = manifest["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    labels = {g["template"]["metadata"]["labels"]["rac.io/memory-version"] for g in groups}
    assert labels == {shards_dir.name}
    assert manifest["spec"]["upgradeStrategy"]["type"] == "NewCluster"
    for g in groups:
        mounts = [m for c in g["template"]["spec"]["containers"] for m in c["volumeMounts"]]
        assert any(shards_dir.is_relative_to(m["mountPath"]) and m["readOnly"] for m in mounts)
