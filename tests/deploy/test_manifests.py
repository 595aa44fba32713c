"""Offline checks of deploy/: Kubernetes manifests, the KEDA ScaledObject, compose, Dockerfile.

Validators: `kubernetes-validate` (strict OpenAPI schemas of the core kinds), `jsonschema` with
the vendored ScaledObject schema in deploy/schemas, `check-jsonschema` with its built-in
compose-spec schema, and `kubectl kustomize` when a kubectl is on PATH. On top of the schemas,
the tests hold the manifests to the code: every service in `shared.subjects.SERVICES` runs,
with the stream and durable names the runtime uses.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared import subjects

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "compose.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
SCALEDOBJECT_SCHEMA = DEPLOY / "schemas" / "keda-scaledobject-v1alpha1.json"

#: Kubernetes versions to validate against: the oldest we support and the newest bundled.
K8S_MIN_VERSION = "1.29"
#: the runtime's default --ack-wait: a replica must be allowed at least this long to finish
DEFAULT_ACK_WAIT_S = 60
#: JetStream features the runtime relies on (consumer pause 2.11; reset needs 2.14 for replay)
NATS_MIN_VERSION = (2, 11)


def _load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _kustomization() -> dict[str, Any]:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())  # type: ignore[no-any-return]


def _k8s_docs() -> list[tuple[str, dict[str, Any]]]:
    """(file name, document) of every resource the kustomization lists."""
    out: list[tuple[str, dict[str, Any]]] = []
    for name in _kustomization()["resources"]:
        out.extend((name, doc) for doc in _load_yaml_docs(K8S / name))
    return out


K8S_DOCS = _k8s_docs()
CORE_DOCS = [(f, d) for f, d in K8S_DOCS if d["apiVersion"] != "keda.sh/v1alpha1"]
SCALED_OBJECTS = [d for _, d in K8S_DOCS if d["kind"] == "ScaledObject"]


def _by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for _, d in K8S_DOCS if d["kind"] == kind}


def _doc_id(item: tuple[str, dict[str, Any]]) -> str:
    return f"{item[1]['kind']}/{item[1]['metadata']['name']}"


def _image_version(image: str) -> tuple[int, ...]:
    tag = image.rsplit(":", 1)[1]
    m = re.match(r"(\d+)\.(\d+)", tag)
    assert m, f"image {image!r} must carry a numeric version tag"
    return (int(m.group(1)), int(m.group(2)))


# --- Kubernetes: schemas --------------------------------------------------------------------


def test_kustomization_lists_every_manifest() -> None:
    listed = set(_kustomization()["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk, (
        f"listed but missing: {listed - on_disk}; on disk but not listed: {on_disk - listed}"
    )
    assert _kustomization()["namespace"] == "skybus"
    for _, doc in K8S_DOCS:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "skybus", _doc_id(("", doc))


@pytest.mark.parametrize("version", [K8S_MIN_VERSION, "latest"])
@pytest.mark.parametrize("item", CORE_DOCS, ids=_doc_id)
def test_core_kinds_validate_strictly(item: tuple[str, dict[str, Any]], version: str) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate not installed")
    version = kv.latest_version() if version == "latest" else version
    try:
        kv.validate(item[1], version, strict=True)
    except kv.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path)
        pytest.fail(
            f"{item[0]}: {_doc_id(item)} invalid for Kubernetes {version} at {path}: {exc.message}"
        )


def test_strict_validation_catches_a_misspelt_field() -> None:
    """Control: strict mode rejects an unknown field, so the passes above mean something."""
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate not installed")
    bad = copy.deepcopy(_by_kind("Deployment")["skybus-calibrate"])
    spec = bad["spec"]["template"]["spec"]
    spec["terminationGracePeriod"] = spec.pop("terminationGracePeriodSeconds")
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, kv.latest_version(), strict=True)


def test_kustomize_renders_the_same_resources() -> None:
    kubectl, kustomize = shutil.which("kubectl"), shutil.which("kustomize")
    if kustomize:
        cmd = [kustomize, "build", str(K8S)]
    elif kubectl:
        cmd = [kubectl, "kustomize", str(K8S)]
    else:
        pytest.skip("neither kustomize nor kubectl on PATH")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    rendered = {(d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(res.stdout) if d}
    assert rendered == {(d["kind"], d["metadata"]["name"]) for _, d in K8S_DOCS}


# --- Kubernetes: the manifests agree with the code ------------------------------------------


@pytest.mark.parametrize("service", subjects.SERVICES)
def test_every_service_has_a_deployment(service: str) -> None:
    deployments = _by_kind("Deployment")
    name = f"skybus-{service}"
    assert name in deployments, f"no Deployment {name} in deploy/k8s"
    dep = deployments[name]
    pod = dep["spec"]["template"]["spec"]
    assert (
        dep["spec"]["selector"]["matchLabels"].items()
        <= dep["spec"]["template"]["metadata"]["labels"].items()
    )
    (container,) = pod["containers"]
    assert container["image"].split(":")[0] == "skybus"
    assert "command" not in container, "keep the image's ENTRYPOINT (skybus)"
    assert container["args"] == [
        "serve",
        service,
        "--nats",
        "$(SKYBUS_NATS_URL)",
        "--store",
        "$(SKYBUS_STORE_URL)",
    ]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= container["resources"][kind].keys(), f"{name}: {kind}"
    # the message in hand is finished on SIGTERM: allow at least one ack-wait for it
    assert pod["terminationGracePeriodSeconds"] >= DEFAULT_ACK_WAIT_S
    # the $(VAR)s in args and the store credentials come from the ConfigMap and the Secret
    env_keys: set[str] = set()
    for src in container["envFrom"]:
        if "configMapRef" in src:
            env_keys |= _by_kind("ConfigMap")[src["configMapRef"]["name"]]["data"].keys()
        if "secretRef" in src:
            env_keys |= _by_kind("Secret")[src["secretRef"]["name"]]["stringData"].keys()
    assert {
        "SKYBUS_NATS_URL",
        "SKYBUS_STORE_URL",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_REGION",
    } <= env_keys


def test_no_deployment_for_an_unknown_service() -> None:
    assert set(_by_kind("Deployment")) == {f"skybus-{s}" for s in subjects.SERVICES}


def test_calibrate_runs_two_replicas() -> None:
    assert _by_kind("Deployment")["skybus-calibrate"]["spec"]["replicas"] == 2


def test_credentials_live_in_the_secret_not_the_configmap() -> None:
    for cm in _by_kind("ConfigMap").values():
        assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & cm["data"].keys()


def test_nats_statefulset_runs_jetstream_on_a_pvc() -> None:
    sts = _by_kind("StatefulSet")["nats"]
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    assert _image_version(container["image"]) >= NATS_MIN_VERSION
    args = container["args"]
    assert "-js" in args
    store_dir = args[args.index("-sd") + 1]
    assert args[args.index("-m") + 1] == "8222"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    claims = {c["metadata"]["name"] for c in sts["spec"]["volumeClaimTemplates"]}
    assert any(path == store_dir and name in claims for name, path in mounts.items()), (
        "JetStream's store dir must be on a volumeClaimTemplate"
    )
    svc = _by_kind("Service")[sts["spec"]["serviceName"]]
    assert svc["spec"]["clusterIP"] == "None"
    ports = {p["port"] for p in _by_kind("Service")["nats"]["spec"]["ports"]}
    assert {4222, 8222} <= ports
    # the services' URL points at that Service
    url = _by_kind("ConfigMap")["skybus-config"]["data"]["SKYBUS_NATS_URL"]
    assert url == "nats://nats:4222"


# --- KEDA ScaledObject ----------------------------------------------------------------------


def _scaledobject_validator() -> Any:
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema not installed")
    schema = json.loads(SCALEDOBJECT_SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_scaledobject_matches_vendored_schema() -> None:
    validator = _scaledobject_validator()
    assert len(SCALED_OBJECTS) == 1
    errors = [
        f"{'.'.join(map(str, e.path))}: {e.message}"
        for e in validator.iter_errors(SCALED_OBJECTS[0])
    ]
    assert not errors, errors


@pytest.mark.parametrize(
    "breakage",
    ["no consumer", "typo in spec", "numeric threshold", "no triggers", "endpoint with scheme"],
)
def test_vendored_schema_rejects_broken_scaledobjects(breakage: str) -> None:
    """Control: the schema is not vacuous."""
    validator = _scaledobject_validator()
    bad = copy.deepcopy(SCALED_OBJECTS[0])
    meta = bad["spec"]["triggers"][0]["metadata"]
    if breakage == "no consumer":
        del meta["consumer"]
    elif breakage == "typo in spec":
        bad["spec"]["maxReplicas"] = bad["spec"].pop("maxReplicaCount")
    elif breakage == "numeric threshold":
        meta["lagThreshold"] = 10
    elif breakage == "no triggers":
        bad["spec"]["triggers"] = []
    elif breakage == "endpoint with scheme":
        meta["natsServerMonitoringEndpoint"] = "http://nats:8222"
    assert list(validator.iter_errors(bad)), breakage


def test_scaledobject_scales_calibrate_on_its_consumer() -> None:
    so = SCALED_OBJECTS[0]
    spec = so["spec"]
    target = spec["scaleTargetRef"]
    assert target.get("kind", "Deployment") == "Deployment"
    assert target["name"] in _by_kind("Deployment")
    assert target["name"] == "skybus-calibrate"
    assert 2 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "nats-jetstream"
    meta = trigger["metadata"]
    assert meta["stream"] == subjects.stream_name(subjects.SERVICE_INPUT["calibrate"])
    assert meta["stream"] == "SKYBUS_DECODED"
    assert meta["consumer"] == subjects.durable_name("calibrate") == "skybus-calibrate"
    assert int(meta["lagThreshold"]) > 0
    # KEDA runs in its own namespace: the endpoint names the nats Service and its namespace
    host, port = meta["natsServerMonitoringEndpoint"].rsplit(":", 1)
    assert port == "8222"
    name, namespace = host.split(".")[:2]
    assert name in _by_kind("Service") and namespace == so["metadata"]["namespace"]


# --- compose --------------------------------------------------------------------------------


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())  # type: ignore[no-any-return]


def test_compose_matches_compose_spec() -> None:
    exe = Path(sys.executable).parent / "check-jsonschema"
    if not exe.exists():
        found = shutil.which("check-jsonschema")
        if found is None:
            pytest.skip("check-jsonschema not installed")
        exe = Path(found)
    res = subprocess.run(
        [str(exe), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("service", subjects.SERVICES)
def test_every_service_has_a_compose_service(service: str) -> None:
    services = _compose()["services"]
    assert service in services, f"no compose service {service!r}"
    svc = services[service]
    assert svc["image"].split(":")[0] == "skybus"
    assert svc["build"]["dockerfile"] == "deploy/Dockerfile"
    cmd = svc["command"]
    assert cmd[:2] == ["serve", service]
    env = svc["environment"]
    # the flags and the environment come from the same ${VAR:-default}, so they agree
    assert cmd[2:] == ["--nats", env["SKYBUS_NATS_URL"], "--store", env["SKYBUS_STORE_URL"]]
    assert {
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_ENDPOINT",
        "AWS_REGION",
    } <= env.keys()
    deps = svc["depends_on"]
    assert deps["nats"]["condition"] == "service_healthy"
    assert deps["create-bucket"]["condition"] == "service_completed_successfully"


def test_compose_calibrate_has_two_replicas() -> None:
    assert _compose()["services"]["calibrate"]["deploy"]["replicas"] == 2


def test_compose_infrastructure() -> None:
    services = _compose()["services"]
    nats = services["nats"]
    assert nats["image"].split(":")[0] == "nats"
    assert _image_version(nats["image"]) >= NATS_MIN_VERSION
    cmd = nats["command"]
    assert "-js" in cmd
    store_dir = cmd[cmd.index("-sd") + 1]
    assert any(v.split(":")[1] == store_dir for v in nats["volumes"]), "JetStream state on a volume"
    assert "healthcheck" in nats and "healthcheck" in services["minio"]
    bucket = services["create-bucket"]
    assert bucket["depends_on"]["minio"]["condition"] == "service_healthy"
    assert bucket.get("restart") == "no"
    # the store URL names the bucket the job creates
    url = services["ingest"]["environment"]["SKYBUS_STORE_URL"]
    m = re.search(r"s3://([^/}]+)/", url)
    assert m and bucket["environment"]["SKYBUS_BUCKET"].endswith(f":-{m.group(1)}}}")


# --- Dockerfile -----------------------------------------------------------------------------


def _final_stage() -> list[str]:
    lines = [ln.strip() for ln in DOCKERFILE.read_text().splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    last_from = max(i for i, ln in enumerate(lines) if ln.upper().startswith("FROM "))
    return lines[last_from:]


def test_dockerfile_entrypoint_is_skybus() -> None:
    stage = _final_stage()
    assert stage[0].split()[1] == "python:3.11-slim"
    entry = [ln for ln in stage if ln.upper().startswith("ENTRYPOINT")]
    assert entry, "final stage has no ENTRYPOINT"
    # exec form, so SIGTERM reaches skybus itself (no shell in between)
    assert json.loads(entry[-1].split(None, 1)[1]) == ["skybus"]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["skybus"] == "shared.cli:main"


def test_dockerfile_installs_every_package() -> None:
    """A new top-level package in pyproject must also be copied into the build context."""
    text = DOCKERFILE.read_text()
    assert re.search(r"pip (install|wheel)\b.*\s\.$", text, re.M), "no `pip install .`-style step"
    includes = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"
    ]["find"]["include"]
    copied = set(re.findall(r"^COPY\s+(\w+)/", text, re.M))
    for pattern in includes:
        assert pattern.rstrip("*") in copied, f"package {pattern} not copied into the image"


def test_extract_pods_get_the_images_compiled_kernels() -> None:
    # The Dockerfile compiles the numba kernels into NUMBA_CACHE_DIR; on the read-only root
    # file system the pod's init container copies them to a writable cache directory, which
    # the extract container uses.
    dockerfile = DOCKERFILE.read_text()
    image_cache = re.search(r"ENV NUMBA_CACHE_DIR=(\S+)", dockerfile)
    assert image_cache and "compile_kernels()" in dockerfile
    pod = _by_kind("Deployment")["skybus-extract"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    cache_dir = {e["name"]: e["value"] for e in container["env"]}["NUMBA_CACHE_DIR"]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert any(cache_dir.startswith(m + "/") for m in mounts), "cache dir must be writable"
    (init,) = pod["initContainers"]
    script = " ".join(init["command"])
    assert f"{image_cache.group(1)}/." in script and cache_dir in script
    assert {m["mountPath"] for m in init["volumeMounts"]} == mounts
