"""cluster/kuberay/*.yaml against KubeRay's own CRD schemas (tests/cluster/crds/, vendored from
ray-project/kuberay) for the stated operator floor and the newest release, unknown fields
forbidden: a misspelt or too-new field fails here instead of being dropped by the API server."""

import copy
import functools
import gzip
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CRDS = Path(__file__).resolve().parent / "crds"
CRD_VERSIONS = ["v1.6.0", "v1.7.0"]  # the floor the manifests state, the newest release
MANIFESTS = {"raycluster.yaml": "rayclusters", "rayjob.yaml": "rayjobs", "rayservice.yaml": "rayservices"}
METADATA_KEYS = {"name", "namespace", "labels", "annotations"}


def strict(schema):
    """The CRD's OpenAPI schema as JSON Schema with every object closed to unknown fields."""
    schema = copy.deepcopy(schema)

    def close(node):
        if not isinstance(node, dict):
            return
        if node.pop("x-kubernetes-int-or-string", False):
            node["type"] = ["integer", "string"]
        if node.get("type") == "object" and "additionalProperties" not in node:
            if node.get("x-kubernetes-preserve-unknown-fields") and "properties" not in node:
                return  # free-form by design (none in the vendored versions; see test below)
            node["additionalProperties"] = False
        for child in node.get("properties", {}).values():
            close(child)
        for key in ("items", "additionalProperties"):
            close(node.get(key))
        for key in ("allOf", "anyOf", "oneOf"):
            for child in node.get(key, []):
                close(child)

    close(schema)
    schema["properties"]["metadata"] = {"type": "object", "propertyNames": {"enum": sorted(METADATA_KEYS)}}
    return schema


@functools.lru_cache(maxsize=None)
def crd(version: str, plural: str) -> dict:
    with gzip.open(CRDS / version / f"ray.io_{plural}.yaml.gz", "rt") as f:
        return yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


@functools.lru_cache(maxsize=None)
def schema_for(version: str, plural: str, api_version: str) -> dict:
    definition = crd(version, plural)
    group, name = api_version.split("/")
    assert definition["spec"]["group"] == group
    (served,) = [v for v in definition["spec"]["versions"] if v["name"] == name and v["served"]]
    return strict(served["schema"]["openAPIV3Schema"])


def validate(doc: dict, version: str, plural: str) -> None:
    # Validator directly: jsonschema.validate would first check the 1 MB schema against the metaschema.
    jsonschema.Draft202012Validator(schema_for(version, plural, doc["apiVersion"])).validate(doc)


def manifest(name: str) -> dict:
    return yaml.safe_load((REPO / "cluster" / "kuberay" / name).read_text())


@pytest.mark.parametrize("version", CRD_VERSIONS)
@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_manifest_is_valid_for_the_kuberay_crd(name, version):
    doc = manifest(name)
    definition = crd(version, MANIFESTS[name])
    assert doc["kind"] == definition["spec"]["names"]["kind"]
    validate(doc, version, MANIFESTS[name])


@pytest.mark.parametrize("version", CRD_VERSIONS)
def test_unknown_and_misplaced_fields_are_refused(version):
    good = manifest("raycluster.yaml")
    validate(good, version, "rayclusters")
    typo = copy.deepcopy(good)
    typo["spec"]["authOption"] = typo["spec"].pop("authOptions")
    with pytest.raises(jsonschema.ValidationError, match="authOption"):
        validate(typo, version, "rayclusters")
    deep = copy.deepcopy(good)
    deep["spec"]["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]["gpus"] = 1
    with pytest.raises(jsonschema.ValidationError, match="gpus"):
        validate(deep, version, "rayclusters")
    wrong_type = copy.deepcopy(good)
    wrong_type["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "eight"
    with pytest.raises(jsonschema.ValidationError, match="eight"):
        validate(wrong_type, version, "rayclusters")
    quantity = copy.deepcopy(good)  # int-or-string resource quantities take both forms
    quantity["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = 15
    validate(quantity, version, "rayclusters")


@pytest.mark.parametrize("version", CRD_VERSIONS)
def test_every_object_in_the_crds_is_closed(version):
    """The strict schemas leave nothing open: no free-form objects slip unknown fields through."""
    open_paths = []

    def walk(node, path):
        if isinstance(node, dict):
            if node.get("type") == "object" and node.get("additionalProperties") is None:
                open_paths.append(path)
            for key, child in node.get("properties", {}).items():
                walk(child, f"{path}.{key}")
            for key in ("items", "additionalProperties"):
                walk(node.get(key), f"{path}[]")

    for plural in set(MANIFESTS.values()):
        schema = schema_for(version, plural, "ray.io/v1")
        walk({**schema, "properties": {k: v for k, v in schema["properties"].items() if k != "metadata"}}, plural)
    assert open_paths == []


def test_authoptions_secretname_needs_the_stated_floor():
    """The manifests use authOptions.secretName, which KubeRay first accepts in 1.6.0."""
    floor = CRD_VERSIONS[0]
    auth = schema_for(floor, "rayclusters", "ray.io/v1")["properties"]["spec"]["properties"]["authOptions"]
    assert {"mode", "secretName"} <= set(auth["properties"])
    for name in MANIFESTS:
        text = (REPO / "cluster" / "kuberay" / name).read_text()
        assert f"KubeRay >= {floor.lstrip('v')}" in text, name
