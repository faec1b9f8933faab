"""deploy/ checked offline: Kubernetes manifests against the API's JSON schemas (kubernetes-validate ships
them), the compose file against the compose-spec schema (check-jsonschema ships it) and `docker compose
config` where a compose CLI exists, and every setting the manifests give the worker against what the code
reads. The init script and the worker probe run for real against the dev server."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import sysconfig
import tomllib
import uuid
from datetime import timedelta
from importlib.resources import files
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest
from temporalio.envconfig import ClientConfig

from tests.conftest import REPO, temporal_binary
from tests.helpers import wait_until
from vaultlayer.catalog.aws import AwsSettings
from vaultlayer.catalog.gcp import GcpSettings
from vaultlayer.ui import SEARCH_ATTRIBUTES
from worker import health

DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "compose"
COMPOSE_FILE = COMPOSE / "docker-compose.yml"
# The oldest Kubernetes minor the manifests promise to work on, and the newest the schemas know.
K8S_VERSIONS = ["1.30", kubernetes_validate.latest_version()]
# Not part of the kustomization: self-hosted clusters only (Temporal Cloud registers attributes with tcld).
OUTSIDE_KUSTOMIZATION = {"search-attributes-job.yaml"}
# Environment the worker gets that belongs to libraries, not to VaultLayer or Temporal's env config.
THIRD_PARTY_ENV = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "GOOGLE_APPLICATION_CREDENTIALS",
                   "PATH", "PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED"}
PACKAGES = ("vaultlayer", "workflows", "activities", "worker", "cli")


def manifests() -> dict[str, list[dict]]:
    return {path.name: [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
            for path in sorted(K8S.glob("*.yaml")) if path.name != "kustomization.yaml"}


def k8s_objects() -> list[dict]:
    return [doc for docs in manifests().values() for doc in docs]


def one(kind: str, name: str) -> dict:
    [found] = [doc for doc in k8s_objects() if doc["kind"] == kind and doc["metadata"]["name"] == name]
    return found


def schema_errors(obj: dict, version: str) -> str | None:
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as err:
        return f"{'.'.join(map(str, err.absolute_path))}: {err.message}"
    return None


def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def compose_schema_errors(doc: dict) -> list[str]:
    schema = json.loads(files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def docker_compose_available() -> bool:
    if not shutil.which("docker"):
        return False
    return subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30).returncode == 0


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, argument) pairs, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", (DEPLOY / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def worker_container() -> dict:
    [container] = one("Deployment", "vaultlayer-worker")["spec"]["template"]["spec"]["containers"]
    return container


def init_script_from_compose() -> tuple[list[str], dict[str, str]]:
    """The temporal-init service's command as the container's shell gets it ($$ is compose's escaped $)."""
    service = compose()["services"]["temporal-init"]
    return [*service["entrypoint"], *(part.replace("$$", "$") for part in service["command"])], service["environment"]


def read_by_code(name: str) -> bool:
    """The name appears as a string literal in the project's code (its env lookups name variables so)."""
    pattern = re.compile(rf"""["']{name}["']""")
    return any(pattern.search(source.read_text()) for package in PACKAGES for source in (REPO / package).rglob("*.py"))


def test_kubernetes_manifests_match_the_api_schemas():
    objects = k8s_objects()
    assert {doc["kind"] for doc in objects} >= {"Deployment", "ServiceAccount", "ConfigMap", "NetworkPolicy"}
    for version in K8S_VERSIONS:
        for doc in objects:
            assert schema_errors(doc, version) is None, (doc["kind"], doc["metadata"]["name"], version)
    # The check has teeth: a misspelt field deep in the pod spec and a wrongly typed value both fail.
    deployment = one("Deployment", "vaultlayer-worker")
    context = deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"]
    context["readOnlyRootFileSystem"] = context.pop("readOnlyRootFilesystem")
    assert "readOnlyRootFileSystem" in schema_errors(deployment, K8S_VERSIONS[0])
    deployment = one("Deployment", "vaultlayer-worker")
    deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"] = ["1Gi"]
    assert "resources.limits.memory" in schema_errors(deployment, K8S_VERSIONS[0])


def test_worker_pod_is_locked_down():
    pod = one("Deployment", "vaultlayer-worker")["spec"]["template"]["spec"]
    container = worker_container()
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                           "capabilities": {"drop": ["ALL"]}}
    assert pod["automountServiceAccountToken"] is False
    assert {"requests", "limits"} <= container["resources"].keys()
    assert {"startupProbe", "readinessProbe", "livenessProbe"} <= container.keys()
    # Read-only root: VL_HOME and /tmp are the writable volumes.
    env = one("ConfigMap", "vaultlayer-worker")["data"]
    mounts = {mount["mountPath"] for mount in container["volumeMounts"]}
    assert {env["VL_HOME"], "/tmp"} <= mounts
    # No secret value in any manifest: secrets are referenced, never inlined.
    assert not [doc for doc in k8s_objects() if doc["kind"] == "Secret"]
    for item in container["env"]:
        assert "valueFrom" in item or not re.search(r"KEY$|SECRET|TOKEN|PASSWORD", item["name"]), item["name"]


def test_network_policy_allows_no_ingress_and_only_dns_temporal_and_https_out():
    policy = one("NetworkPolicy", "vaultlayer")
    spec = policy["spec"]
    pod_labels = one("Deployment", "vaultlayer-worker")["spec"]["template"]["metadata"]["labels"]
    assert spec["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert set(spec["policyTypes"]) == {"Ingress", "Egress"} and spec["ingress"] == []
    ports = sorted({(port["protocol"], port["port"]) for rule in spec["egress"] for port in rule["ports"]})
    assert ports == [("TCP", 53), ("TCP", 443), ("TCP", 7233), ("UDP", 53)]
    for rule in spec["egress"]:
        for peer in rule["to"]:
            if "ipBlock" in peer:  # the open CIDR never includes the node's metadata service
                assert "169.254.0.0/16" in peer["ipBlock"]["except"]


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert set(kustomization["resources"]) == set(manifests()) - OUTSIDE_KUSTOMIZATION
    job = one("Job", "vaultlayer-search-attributes")
    assert job["metadata"]["namespace"] == kustomization["namespace"]


@pytest.mark.skipif(not shutil.which("kubectl"), reason="kubectl is not installed")
def test_kustomize_builds_and_its_output_validates():
    built = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert built.returncode == 0, built.stderr
    objects = [doc for doc in yaml.safe_load_all(built.stdout) if doc]
    assert len(objects) == sum(len(docs) for name, docs in manifests().items() if name not in OUTSIDE_KUSTOMIZATION)
    for doc in objects:
        assert schema_errors(doc, K8S_VERSIONS[0]) is None, doc["metadata"]["name"]
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "vaultlayer"


def test_compose_file_matches_the_compose_spec():
    doc = compose()
    assert compose_schema_errors(doc) == []
    doc["services"]["worker"]["helthcheck"] = doc["services"]["worker"].pop("healthcheck")
    assert any("helthcheck" in error for error in compose_schema_errors(doc))
    services = compose()["services"]
    assert {"postgresql", "temporal-schema", "temporal", "temporal-init", "temporal-ui", "worker"} <= services.keys()
    for name, service in services.items():
        image = service.get("image", "")
        assert re.fullmatch(r"[\w./-]+:\d[\w.-]*", image), f"{name}: pin the image tag ({image!r})"
        for dependency in service.get("depends_on", {}).values():
            assert dependency["condition"] in {"service_healthy", "service_completed_successfully"}
    for name in ("postgresql", "temporal", "worker"):
        assert "healthcheck" in services[name], name
    # What the schema cannot see: references between services, volumes and files.
    named_volumes = set(compose()["volumes"])
    for name, service in services.items():
        assert set(service.get("depends_on", {})) <= services.keys(), name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert (COMPOSE / source).is_dir() if source.startswith(".") else source in named_volumes, volume
    dynamic_config = services["temporal"]["environment"]["DYNAMIC_CONFIG_FILE_PATH"]
    assert (COMPOSE / "dynamicconfig" / Path(dynamic_config).name).is_file()
    assert (COMPOSE / services["worker"]["build"]["context"] / services["worker"]["build"]["dockerfile"]).is_file()


@pytest.mark.skipif(not docker_compose_available(), reason="no docker CLI with the compose plugin")
def test_docker_compose_config_accepts_the_file():
    env = {**os.environ, "POSTGRES_PASSWORD": "not-a-secret"}
    checked = subprocess.run(["docker", "compose", "-f", str(COMPOSE_FILE), "config", "-q"],
                             capture_output=True, text=True, env=env, timeout=60)
    assert checked.returncode == 0, checked.stderr


def test_compose_keeps_secrets_out_of_the_file():
    text = COMPOSE_FILE.read_text()
    referenced = set(re.findall(r"(?<!\$)\$\{([A-Z_][A-Z0-9_]*)", text))
    example = {line.split("=", 1)[0] for line in (COMPOSE / ".env.example").read_text().splitlines()
               if "=" in line and not line.startswith("#")}
    assert referenced <= example, f"document these in .env.example: {sorted(referenced - example)}"
    assert re.search(r"POSTGRES_PASSWORD:\s*\$\{POSTGRES_PASSWORD:\?", text), "the password must come from .env"
    ignored = (COMPOSE / ".gitignore").read_text().split()
    assert {".env", "worker.env", "secrets/*"} <= set(ignored)
    worker = compose()["services"]["worker"]
    assert worker["env_file"] == [{"path": "worker.env", "required": False}]
    assert worker["read_only"] is True


def test_worker_settings_are_the_ones_the_code_reads(tmp_path: Path):
    """Every variable a manifest gives the worker is read by Temporal's env config or by VaultLayer's code."""
    compose_env = set(compose()["services"]["worker"]["environment"])
    example_env = {match for match in re.findall(r"^#?([A-Z][A-Z0-9_]*)=", (COMPOSE / "worker.env.example").read_text(),
                                                 re.M)}
    k8s_env = set(one("ConfigMap", "vaultlayer-worker")["data"]) | {item["name"] for item in worker_container()["env"]}
    docker_env = {name for instruction, argument in dockerfile() if instruction == "ENV"
                  for name in re.findall(r"(?:^|\s)([A-Z][A-Z0-9_]*)=", argument)}
    names = compose_env | example_env | k8s_env | docker_env
    assert {"TEMPORAL_ADDRESS", "TEMPORAL_NAMESPACE", "VL_HOME", "VL_ENCRYPTION_KEY_FILE"} <= names

    baseline = ClientConfig.load_client_connect_config(override_env_vars={})
    for name in sorted(names - THIRD_PARTY_ENV):
        if name.startswith("TEMPORAL_"):
            read = ClientConfig.load_client_connect_config(override_env_vars={name: "x:1"})
            assert read != baseline, f"{name} is not a variable of Temporal's environment configuration"
        else:
            assert name.startswith("VL_") and read_by_code(name), f"no code reads {name}"

    # The files the settings name are where the manifests put them.
    env = one("ConfigMap", "vaultlayer-worker")["data"]
    mounts = {mount["name"]: mount["mountPath"] for mount in worker_container()["volumeMounts"]}
    providers = one("ConfigMap", "vaultlayer-providers")["data"]
    for variable, key in (("VL_AWS_CONFIG", "aws.toml"), ("VL_GCP_CONFIG", "gcp.toml")):
        assert env[variable] == f"{mounts['providers']}/{key}"
    [key_file] = [item["value"] for item in worker_container()["env"] if item["name"] == "VL_ENCRYPTION_KEY_FILE"]
    assert Path(key_file).parent == Path(mounts["encryption"])
    # And the providers' settings shown are ones the providers accept (their models forbid unknown keys).
    assert set(providers) == {"aws.toml"}  # each file here is a provider the worker sweeps at start
    for model, text in ((AwsSettings, providers["aws.toml"]),
                        (AwsSettings, (COMPOSE / "config" / "aws.toml.example").read_text()),
                        (GcpSettings, (COMPOSE / "config" / "gcp.toml.example").read_text())):
        model.model_validate(tomllib.loads(text))


def test_the_image_runs_commands_the_cli_has():
    instructions = dict(dockerfile())
    assert json.loads(instructions["ENTRYPOINT"]) == ["vl"] and json.loads(instructions["CMD"]) == ["worker"]
    assert worker_container()["args"] == ["worker"] and "command" not in worker_container()
    assert "command" not in compose()["services"]["worker"]
    assert tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]["vl"] == "cli.main:main"
    vl = Path(sysconfig.get_path("scripts")) / "vl"
    shown = subprocess.run([str(vl if vl.exists() else shutil.which("vl")), "worker", "--help"],
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and "usage: vl worker" in shown.stdout, shown.stderr
    # One probe everywhere, and the image holds every package the project installs.
    probe = ["python", "-m", "worker.health"]
    assert json.loads(instructions["HEALTHCHECK"].split("CMD", 1)[1]) == probe
    assert compose()["services"]["worker"]["healthcheck"]["test"] == ["CMD", *probe]
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert worker_container()[kind]["exec"]["command"] == probe
    copied = {source for instruction, argument in dockerfile() if instruction == "COPY" and "--from" not in argument
              for source in argument.split()[:-1]}
    find = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packaged = {pattern.rstrip("*") for pattern in find["include"]}
    assert packaged == set(PACKAGES) and packaged <= copied
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert copied <= allowed and {"pyproject.toml", "README.md"} <= copied


async def test_init_job_registers_the_search_attributes_the_code_sets(temporal_env, temporal_address):
    """The compose init service's own script, run twice (it must be idempotent) on a fresh namespace."""
    command, service_env = init_script_from_compose()
    [job_container] = one("Job", "vaultlayer-search-attributes")["spec"]["template"]["spec"]["containers"]
    assert [*job_container["command"], *job_container["args"]] == command
    assert set(service_env) <= {item["name"] for item in job_container["env"]}
    namespace = f"vl-deploy-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, **service_env, "TEMPORAL_ADDRESS": temporal_address, "TEMPORAL_NAMESPACE": namespace,
           "PATH": f"{Path(temporal_binary()).parent}{os.pathsep}{os.environ['PATH']}"}
    env["NAMESPACE_RETENTION"] = "24h"
    for _ in range(2):
        process = await asyncio.create_subprocess_exec(*command, env=env, stdout=asyncio.subprocess.PIPE,
                                                       stderr=asyncio.subprocess.STDOUT)
        output, _ = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode == 0, output.decode()
    listed = await temporal_env.client.operator_service.list_search_attributes(
        ListSearchAttributesRequest(namespace=namespace))
    registered = {name: IndexedValueType.Name(kind).removeprefix("INDEXED_VALUE_TYPE_").title().replace("_", "")
                  for name, kind in listed.custom_attributes.items() if name.startswith("Vl")}
    assert registered == SEARCH_ATTRIBUTES


async def test_probe_passes_while_this_host_polls_and_fails_otherwise(temporal_env, temporal_address, control,
                                                                     monkeypatch):
    client, hostname = temporal_env.client, socket.gethostname()

    async def polled():
        return await health.problem(client, control, hostname) is None

    await wait_until(polled, 30, "this host's worker to poll its queue")
    # The probe exactly as the manifests run it, in its own process, with the worker's settings.
    env = {**os.environ, "TEMPORAL_ADDRESS": temporal_address, "VL_TASK_QUEUE": control}
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "worker.health", cwd=REPO, env=env,
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output, _ = await asyncio.wait_for(process.communicate(), 60)
    assert (process.returncode, output.decode().strip()) == (0, "healthy")

    nobody = f"vl-nobody-{uuid.uuid4().hex[:8]}"
    assert f"no worker on {hostname} polls task queue {nobody!r}" in await health.problem(client, nobody, hostname)
    assert await health.problem(client, control, "another-host") is not None
    # The server lists a stopped worker for minutes: only a recent poll counts.
    assert "last polled" in await health.problem(client, control, hostname, max_poll_age=timedelta(0))
    monkeypatch.setenv("TEMPORAL_ADDRESS", "127.0.0.1:1")
    assert "connect" in await health.check(control, timeout=10)


def test_deploy_docs_link_to_files_that_exist():
    for doc in (REPO / "docs" / "deploy.md", DEPLOY / "README.md"):
        links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text())
        local = [link for link in links if not re.match(r"[a-z]+://", link)]
        assert local, doc
        for link in local:
            assert (doc.parent / link).exists(), f"{doc.relative_to(REPO)} links to a missing {link}"
