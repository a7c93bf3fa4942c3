"""Deployment files, checked without a cluster, a Docker engine or a Helm binary.

What is proved here:
- every YAML file under deploy/, docker-compose.yml and the chart's YAML parse;
- both Ray Serve configs pass Ray's own schema (the one `serve deploy` and KubeRay's
  serveConfigV2 go through), use no key Ray would silently ignore, and, pushed through the
  Serve controller's own override code, give each of the five deployments the stated
  CPUs, GPU fraction, concurrency and autoscaling;
- the RayService embeds exactly deploy/serve/config.yaml; its head does no work, its GPU
  group asks for whole GPUs, and the worker groups can hold every Serve replica at max scale;
- the Helm values validate against values.schema.json, invalid values are rejected, the
  chart's Serve values equal deploy/serve/config.yaml, and every `.Values.x.y` a template
  reads exists in values.yaml (and every value is read by some template);
- plain manifests: selectors match pod labels, Services point at named ports that exist,
  referenced ConfigMaps exist, Redis is durable (AOF + PVC), kustomization lists every file;
- docker-compose.yml: every service has an image or build and a healthcheck, dependencies
  exist; Dockerfiles are multi-stage, non-root, pinned, with a HEALTHCHECK and no weights;
- the gateway runs in compose, the plain manifests and the chart with the same command, port,
  probes and Serve application, its settings parse, and every pod that verifies or signs session
  tokens (Ray pods, the gateway) gets AVATAR_FORCING_AUTH_SECRET from a Secret, never from a
  ConfigMap or a literal;
- the LiveKit bridge runs in compose, the plain manifests and the chart with the same command,
  port, probes and variables (each one the worker reads), scaled by its own HorizontalPodAutoscaler
  (autoscaling/v2, on CPU, targeting its Deployment), with a grace period longer than its shutdown,
  no token secret, and a NetworkPolicy that lets it out to Redis, Serve's gRPC port and LiveKit only.

Optional, when the tool is installed (skipped otherwise; the checks above always run):
`docker compose config -q` and offline rendering of the chart with helm-python-sdk.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

# Ray's own pydantic models warn about deprecated Field arguments on import; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Using extra keyword arguments on `Field`:DeprecationWarning")

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SERVE_CONFIG = DEPLOY / "serve" / "config.yaml"
SERVE_CONFIG_CPU = DEPLOY / "serve" / "config.cpu.yaml"
RAYSERVICE = DEPLOY / "kuberay" / "rayservice.yaml"
K8S = DEPLOY / "k8s"
OTEL = DEPLOY / "otel"
COMPOSE = ROOT / "docker-compose.yml"
CHART = ROOT / "helm" / "avatar-forcing"

DEPLOYMENTS = ("session_ingress", "audio_features", "motion_encoder", "generator", "decoder")
# The resources the deployments are sized with (GPU fractions of one GPU, CPUs per replica).
GPU_FRACTIONS = {"session_ingress": 0.0, "audio_features": 0.125, "motion_encoder": 0.125, "generator": 0.5,
                 "decoder": 0.25}  # fmt: skip
GPU_CPUS = {"session_ingress": 1, "audio_features": 1, "motion_encoder": 1, "generator": 2, "decoder": 1}
SERVICERS = {  # proto module -> service, as in protos/avatar_forcing/v1/*.proto
    "audio_features": "AudioFeatures",
    "motion_encoder": "MotionEncoder",
    "generator": "MotionGenerator",
    "decoder": "FrameDecoder",
    "session": "AvatarSession",
}


def load(path: Path):
    return yaml.safe_load(path.read_text())


def load_all(path: Path) -> list:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def deployments_by_name(serve_config: dict) -> dict[str, dict]:
    (app,) = serve_config["applications"]
    return {d["name"]: d for d in app["deployments"]}


def quantity(value) -> float:
    """Kubernetes quantity -> number (CPUs, or bytes for memory)."""
    if isinstance(value, int | float):
        return float(value)
    units = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value))
    assert match, f"not a quantity: {value!r}"
    return float(match.group(1)) * units.get(match.group(2), 1.0)


# --------------------------------------------------------------------------------------------
# Every YAML file parses


def yaml_files() -> list[Path]:
    files = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))
    files += [COMPOSE, CHART / "Chart.yaml", CHART / "values.yaml", *sorted((CHART / "files").glob("*.yaml"))]
    return files


def test_yaml_files_exist():
    names = {p.relative_to(ROOT).as_posix() for p in yaml_files()}
    for required in ("deploy/serve/config.yaml", "deploy/serve/config.cpu.yaml", "deploy/kuberay/rayservice.yaml",
                     "deploy/otel/collector.yaml", "docker-compose.yml", "deploy/k8s/gateway.yaml",
                     "deploy/k8s/bridge.yaml"):  # fmt: skip
        assert required in names
    assert len(list(K8S.glob("*.yaml"))) >= 9


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_yaml_parses(path):
    docs = load_all(path)
    assert docs, f"{path} has no YAML document"
    for doc in docs:
        assert isinstance(doc, dict), f"{path}: a document is a {type(doc).__name__}, expected a mapping"


# --------------------------------------------------------------------------------------------
# Ray Serve config: Ray's schema, no ignored keys, the controller's view of the resources


@pytest.fixture(scope="module")
def serve_schema():
    from ray.serve import schema

    return schema


@pytest.mark.parametrize("path", [SERVE_CONFIG, SERVE_CONFIG_CPU], ids=lambda p: p.name)
def test_serve_config_validates_with_ray_schema(serve_schema, path):
    config = serve_schema.ServeDeploySchema.model_validate(load(path))
    (app,) = config.applications
    assert app.import_path == "services.serve_app:app"
    assert app.route_prefix == "/"
    assert sorted(app.deployment_names) == sorted(DEPLOYMENTS)
    assert config.grpc_options.port == 9000
    assert config.http_options.port == 8000
    assert config.http_options.host == "0.0.0.0"
    expected = {
        f"services._generated.avatar_forcing.v1.{module}_pb2_grpc.add_{service}Servicer_to_server"
        for module, service in SERVICERS.items()
    }
    assert set(config.grpc_options.grpc_servicer_functions) == expected
    for d in app.deployments:
        assert d.ray_actor_options.num_cpus is not None, f"{d.name}: num_cpus unset"
        assert d.ray_actor_options.num_gpus is not None, f"{d.name}: num_gpus unset"
        assert d.graceful_shutdown_timeout_s > 0, f"{d.name}: graceful_shutdown_timeout_s unset"
        assert d.health_check_period_s > 0 and d.health_check_timeout_s > 0, f"{d.name}: health checks unset"
        assert d.max_ongoing_requests > 0, f"{d.name}: max_ongoing_requests unset"
        # Nothing is fetched at run time: no working_dir / pip / py_modules.
        assert not set(d.ray_actor_options.runtime_env) & {"working_dir", "pip", "py_modules", "conda", "uv"}
    assert not set(app.runtime_env) - {"env_vars"}, "the app runtime_env may only set env_vars"


def _unknown_keys(data: dict, model, where: str) -> list[str]:
    """Keys Ray would accept and ignore (its top-level models allow extras), recursively."""
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import (
        DeploymentSchema,
        HTTPOptionsSchema,
        LoggingConfig,
        RayActorOptionsSchema,
        ServeApplicationSchema,
        gRPCOptionsSchema,
    )

    nested = {
        "http_options": HTTPOptionsSchema,
        "grpc_options": gRPCOptionsSchema,
        "logging_config": LoggingConfig,
        "applications": ServeApplicationSchema,
        "deployments": DeploymentSchema,
        "ray_actor_options": RayActorOptionsSchema,
        "autoscaling_config": AutoscalingConfig,
    }
    fields = set(model.model_fields) | {f.alias for f in model.model_fields.values() if f.alias}
    unknown = [f"{where}.{key}" for key in data if key not in fields]
    for key, value in data.items():
        if key in nested and key in fields:
            for i, item in enumerate(value if isinstance(value, list) else [value]):
                unknown += _unknown_keys(item, nested[key], f"{where}.{key}[{i}]")
    return unknown


@pytest.mark.parametrize("path", [SERVE_CONFIG, SERVE_CONFIG_CPU], ids=lambda p: p.name)
def test_serve_config_has_no_ignored_keys(serve_schema, path):
    assert _unknown_keys(load(path), serve_schema.ServeDeploySchema, path.name) == []


def controller_view(serve_config: dict) -> dict:
    """The deployment infos the Serve controller derives from this config (its own override code,
    applied to stub deployments of the same names), without starting Ray."""
    import ray
    from ray import serve
    from ray.serve._private.application_state import override_deployment_info
    from ray.serve._private.build_app import build_app
    from ray.serve._private.deployment_info import DeploymentInfo
    from ray.serve.schema import ServeDeploySchema

    @serve.deployment
    class Stub:
        def __call__(self):
            return None

    infos = {}
    for name in DEPLOYMENTS:
        (built,) = build_app(Stub.options(name=name).bind(), name=name).deployments
        infos[name] = DeploymentInfo(
            deployment_config=built._deployment_config,
            replica_config=built._replica_config,
            start_time_ms=0,
            deployer_job_id="01000000",
        )
    (app,) = ServeDeploySchema.model_validate(serve_config).applications
    result = override_deployment_info(infos, app)
    assert not ray.is_initialized(), "checking the config must not start Ray"
    return result


def test_gpu_serve_config_resources_as_applied_by_the_controller():
    infos = controller_view(load(SERVE_CONFIG))
    for name in DEPLOYMENTS:
        info = infos[name]
        resources = info.replica_config.resource_dict
        assert resources["GPU"] == GPU_FRACTIONS[name], f"{name}: GPU {resources['GPU']}"
        assert resources["CPU"] == GPU_CPUS[name], f"{name}: CPU {resources['CPU']}"
        autoscaling = info.deployment_config.autoscaling_config
        assert autoscaling is not None, f"{name}: no autoscaling"
        assert 1 <= autoscaling.min_replicas <= autoscaling.max_replicas
        assert autoscaling.target_ongoing_requests <= info.deployment_config.max_ongoing_requests
    # Stages behind the ingress have a bounded queue: late blocks fail fast instead of piling up.
    for name in ("audio_features", "motion_encoder", "generator", "decoder"):
        assert infos[name].deployment_config.max_queued_requests > 0, f"{name}: unbounded queue"
    # One replica of each GPU stage fills exactly one GPU.
    assert sum(GPU_FRACTIONS.values()) == 1.0


def test_cpu_serve_config_runs_tiny_without_gpus():
    config = load(SERVE_CONFIG_CPU)
    infos = controller_view(config)
    for name in DEPLOYMENTS:
        assert infos[name].replica_config.resource_dict["GPU"] == 0, f"{name} asks for a GPU"
        assert infos[name].deployment_config.num_replicas == 1
        assert infos[name].deployment_config.autoscaling_config is None
        env = infos[name].replica_config.ray_actor_options["runtime_env"]["env_vars"]
        assert env["AVATAR_FORCING_CONFIG"] == "tiny" and env["AF_MODEL_PRESET"] == "tiny"
    # Same application shape as the GPU config: only sizes differ.
    gpu = load(SERVE_CONFIG)
    for key in ("proxy_location", "http_options", "grpc_options"):
        assert config[key] == gpu[key], key


def test_grpc_servicer_functions_match_the_protos():
    proto_dir = ROOT / "protos" / "avatar_forcing" / "v1"
    if not list(proto_dir.glob("*.proto")):
        pytest.skip("protos/avatar_forcing/v1 has no .proto yet")
    for module, service in SERVICERS.items():
        proto = proto_dir / f"{module}.proto"
        assert proto.exists(), f"grpc_servicer_functions names {module}_pb2_grpc but {proto} is missing"
        assert re.search(rf"^service {service} \{{", proto.read_text(), re.MULTILINE), f"{proto}: no service {service}"


# --------------------------------------------------------------------------------------------
# KubeRay RayService


@pytest.fixture(scope="module")
def rayservice() -> dict:
    (doc,) = load_all(RAYSERVICE)
    return doc


def _groups(rayservice: dict) -> dict[str, dict]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    return {g["groupName"]: g for g in cluster["workerGroupSpecs"]}


def _container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]


def test_rayservice_embeds_the_serve_config(serve_schema, rayservice):
    assert rayservice["apiVersion"] == "ray.io/v1" and rayservice["kind"] == "RayService"
    embedded = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    serve_schema.ServeDeploySchema.model_validate(embedded)
    assert embedded == load(SERVE_CONFIG), "serveConfigV2 must be deploy/serve/config.yaml verbatim"


def test_rayservice_cluster_shape(rayservice):
    import ray

    cluster = rayservice["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__, "rayVersion must match the installed ray[serve]"
    assert cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0", "the head must not host replicas"
    head_container = head["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head_container["resources"].get("limits", {})
    ports = {p["name"]: p["containerPort"] for p in head_container["ports"]}
    assert ports["grpc"] == 9000 and ports["serve"] == 8000 and ports["dashboard"] == 8265
    groups = _groups(rayservice)
    assert set(groups) == {"cpu", "gpu"}
    assert "nvidia.com/gpu" not in _container(groups["cpu"])["resources"].get("limits", {})
    gpu = groups["gpu"]
    gpu_container = _container(gpu)
    assert gpu_container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu_container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert gpu["template"]["spec"]["nodeSelector"], "GPU workers need a GPU node selector"
    assert any(t["key"] == "nvidia.com/gpu" for t in gpu["template"]["spec"]["tolerations"])
    for group in (head, *groups.values()):
        assert group["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
        env_from = _container(group)["envFrom"]
        assert {"name": "avatar-forcing-config"} in [e.get("configMapRef") for e in env_from]
        assert group["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == "ray"
    for name, group in groups.items():
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], name
    # Weights: read-only from a volume on the GPU workers, never baked in or downloaded.
    mounts = {m["name"]: m for m in gpu_container["volumeMounts"]}
    assert mounts["weights"]["readOnly"] is True
    volumes = {v["name"]: v for v in gpu["template"]["spec"]["volumes"]}
    assert volumes["weights"]["persistentVolumeClaim"]["readOnly"] is True
    # Replicas get to finish their graceful shutdown before the pod is killed.
    generator = deployments_by_name(load(SERVE_CONFIG))["generator"]
    assert gpu["template"]["spec"]["terminationGracePeriodSeconds"] > generator["graceful_shutdown_timeout_s"]


def check_capacity(deployments: dict, cpu_group: dict | None, gpu_group: dict, gpus_per_pod: int) -> None:
    """Every Serve replica at max scale fits in the worker groups at max scale, and the minimum
    set fits in the minimum pods. (Replicas beyond that would sit pending forever.)"""

    def demand(key: str, resource: str, which: list[str]) -> float:
        return sum(
            d["autoscaling_config"][key] * d["ray_actor_options"][resource]
            for name, d in deployments.items()
            if name in which
        )

    gpu_stages = [n for n, d in deployments.items() if d["ray_actor_options"]["num_gpus"] > 0]
    cpu_stages = [n for n in deployments if n not in gpu_stages]
    gpu_cpus = quantity(gpu_group["cpus"])
    assert demand("max_replicas", "num_gpus", gpu_stages) <= gpu_group["maxReplicas"] * gpus_per_pod
    assert demand("min_replicas", "num_gpus", gpu_stages) <= max(gpu_group["minReplicas"], 1) * gpus_per_pod
    assert demand("max_replicas", "num_cpus", gpu_stages) <= gpu_group["maxReplicas"] * gpu_cpus
    one_of_each_gpu = sum(deployments[n]["ray_actor_options"]["num_gpus"] for n in gpu_stages)
    assert one_of_each_gpu <= gpus_per_pod, "one replica of every GPU stage must fit on one GPU pod"
    if cpu_group is not None:
        cpu_capacity = cpu_group["maxReplicas"] * quantity(cpu_group["cpus"])
        assert demand("max_replicas", "num_cpus", cpu_stages) <= cpu_capacity


def test_rayservice_worker_groups_hold_every_replica_at_max_scale(rayservice):
    groups = _groups(rayservice)

    def group(name: str) -> dict:
        limits = _container(groups[name])["resources"]["limits"]
        return {**groups[name], "cpus": limits["cpu"]}

    gpus = _container(groups["gpu"])["resources"]["limits"]["nvidia.com/gpu"]
    check_capacity(deployments_by_name(load(SERVE_CONFIG)), group("cpu"), group("gpu"), gpus)


# --------------------------------------------------------------------------------------------
# Plain Kubernetes manifests


@pytest.fixture(scope="module")
def k8s_objects() -> list[dict]:
    objects = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        objects += load_all(path)
    return objects


def _pod_templates(objects: list[dict]) -> list[tuple[str, dict]]:
    return [
        (o["metadata"]["name"], o["spec"]["template"]) for o in objects if o["kind"] in ("Deployment", "StatefulSet")
    ]


def _ray_pod_templates() -> list[dict]:
    (rs,) = load_all(RAYSERVICE)
    cluster = rs["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]


def test_k8s_objects_are_well_formed(k8s_objects):
    for obj in k8s_objects:
        assert obj.get("apiVersion") and obj.get("kind"), obj
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", obj["metadata"]["name"]), obj["metadata"]["name"]
        assert "namespace" not in obj["metadata"] or obj["kind"] == "Namespace", "namespaces come from kustomize"
    for name, template in _pod_templates(k8s_objects):
        owner = next(o for o in k8s_objects if o["metadata"]["name"] == name and "template" in o.get("spec", {}))
        selector = owner["spec"]["selector"]["matchLabels"]
        labels = template["metadata"]["labels"]
        assert selector.items() <= labels.items(), f"{name}: selector {selector} does not match its pods"
        spec = template["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True, f"{name} runs as root"
        for container in spec["containers"]:
            assert container["image"] and ":" in container["image"], f"{name}: unpinned image"
            assert container["resources"]["requests"] and container["resources"]["limits"], f"{name}: resources"
            assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_k8s_services_select_pods_with_the_named_ports(k8s_objects):
    pods = [t for _, t in _pod_templates(k8s_objects)] + _ray_pod_templates()
    for svc in (o for o in k8s_objects if o["kind"] == "Service"):
        selector = {k: v for k, v in svc["spec"]["selector"].items() if k != "ray.io/serve"}  # set by KubeRay
        matched = [t for t in pods if selector.items() <= t["metadata"]["labels"].items()]
        assert matched, f"Service {svc['metadata']['name']} selects no pod"
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            for template in matched:
                container_ports = [p for c in template["spec"]["containers"] for p in c.get("ports", [])]
                if isinstance(target, str):
                    assert target in {p.get("name") for p in container_ports}, f"{svc['metadata']['name']}: {target}"
                else:
                    assert target in {p["containerPort"] for p in container_ports}, f"{svc['metadata']['name']}"


def test_k8s_config_references_exist(k8s_objects):
    configmaps = {o["metadata"]["name"] for o in k8s_objects if o["kind"] == "ConfigMap"}
    claims = {o["metadata"]["name"] for o in k8s_objects if o["kind"] == "PersistentVolumeClaim"}
    example_secrets = {o["metadata"]["name"]: o["stringData"] for o in load_all(K8S / "secret.example.yaml")}
    templates = [t for _, t in _pod_templates(k8s_objects)] + _ray_pod_templates()
    for template in templates:
        spec = template["spec"]
        for container in spec["containers"]:
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    assert source["configMapRef"]["name"] in configmaps
                if "secretRef" in source:
                    assert source["secretRef"]["name"] in example_secrets, "every Secret has a template"
            for variable in container.get("env", []):
                ref = variable.get("valueFrom", {}).get("secretKeyRef")
                if ref is not None:
                    assert ref["key"] in example_secrets.get(ref["name"], {}), (
                        f"{variable['name']}: {ref} has no template"
                    )
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in configmaps
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims
    for secret in load_all(K8S / "secret.example.yaml"):
        for key, value in secret["stringData"].items():
            assert "REPLACE-ME" in value, f"secret.example.yaml {key}: only placeholders belong here"
    # Clients reach Serve's gRPC proxy through this Service, on the port the Serve config and the pods use.
    config = next(o for o in k8s_objects if o["metadata"]["name"] == "avatar-forcing-config")["data"]
    grpc_port = load(SERVE_CONFIG)["grpc_options"]["port"]
    services = {o["metadata"]["name"]: o for o in k8s_objects if o["kind"] == "Service"}
    grpc_ports = services["avatar-forcing-serve-grpc"]["spec"]["ports"]
    assert {"name": "grpc", "port": grpc_port, "targetPort": grpc_port, "appProtocol": "grpc"} in grpc_ports
    assert int(config["AF_GRPC_PORT"]) == grpc_port
    for name in ("REDIS_URL", "OTEL_EXPORTER_OTLP_ENDPOINT", "LOG_LEVEL"):
        assert config[name]
    assert config["AVATAR_FORCING_WEIGHTS"] == config["AF_WEIGHTS_DIR"] == "/weights"
    assert config["AVATAR_FORCING_CONFIG"] == config["AF_MODEL_PRESET"] == "paper"


def test_kustomization_lists_every_manifest():
    kustomization = load(K8S / "kustomization.yaml")
    listed = set(kustomization["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    assert listed == present


def test_redis_is_durable(k8s_objects):
    conf = next(o for o in k8s_objects if o["metadata"]["name"] == "avatar-forcing-redis-config")["data"]["redis.conf"]
    settings = dict(line.split("#")[0].split(None, 1) for line in conf.splitlines() if line.split("#")[0].strip())
    assert settings["appendonly"].strip() == "yes"
    assert settings["appendfsync"].strip() in ("always", "everysec")
    assert settings["maxmemory-policy"].strip() == "noeviction"
    redis = next(o for o in k8s_objects if o["kind"] == "StatefulSet")
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    mounts = {m["name"]: m["mountPath"] for m in redis["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert mounts["data"] == settings["dir"].strip()
    compose_redis = load(COMPOSE)["services"]["redis"]
    command = compose_redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert any(v.endswith(":/data") for v in compose_redis["volumes"])


def test_network_policies_select_existing_pods(k8s_objects):
    pods = [t["metadata"]["labels"] for _, t in _pod_templates(k8s_objects)]
    pods += [t["metadata"]["labels"] for t in _ray_pod_templates()]
    policies = [o for o in k8s_objects if o["kind"] == "NetworkPolicy"]
    assert {"avatar-forcing-redis", "avatar-forcing-ray", "avatar-forcing-gateway"} <= {
        p["metadata"]["name"] for p in policies
    }
    for policy in policies:
        selector = policy["spec"]["podSelector"]["matchLabels"]
        assert any(selector.items() <= labels.items() for labels in pods), policy["metadata"]["name"]
        # Peers in this namespace (no namespaceSelector) must select pods that exist: a rule for
        # traffic from a component that is not deployed is dead, and hides what really connects.
        local_peers = [
            peer["podSelector"]
            for rule in policy["spec"]["ingress"]
            for peer in rule.get("from", [])
            if "podSelector" in peer and "namespaceSelector" not in peer
        ]
        for peer in local_peers:
            assert any(_selects(peer, labels) for labels in pods), f"{policy['metadata']['name']}: {peer} selects none"
    ray = next(p for p in policies if p["metadata"]["name"] == "avatar-forcing-ray")
    serve_rules = [r for r in ray["spec"]["ingress"] if {9000, 8000} <= {p["port"] for p in r.get("ports", [])}]
    assert serve_rules, "no rule admits Serve clients"
    assert all(r.get("from") for r in serve_rules), "Serve's ports must not be open to everyone"


def _selects(selector: dict, labels: dict) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions) against a pod's labels."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[operator]
        if not ok:
            return False
    return True


# --------------------------------------------------------------------------------------------
# OpenTelemetry collector


def test_otel_collector_pipelines():
    config = load(OTEL / "collector.yaml")
    service = config["service"]
    assert "otlp" in config["receivers"] and {"grpc", "http"} <= set(config["receivers"]["otlp"]["protocols"])
    assert "batch" in config["processors"]
    assert {"debug", "otlp", "prometheus"} <= set(config["exporters"])
    assert config["exporters"]["prometheus"]["endpoint"].endswith(":8889")
    overlay = load(OTEL / "collector.forward.yaml")
    for cfg in (
        config,
        {**config, "service": {**service, "pipelines": {**service["pipelines"], **overlay["service"]["pipelines"]}}},
    ):
        for name, pipeline in cfg["service"]["pipelines"].items():
            assert "batch" in pipeline["processors"], name
            for kind in ("receivers", "processors", "exporters"):
                for component in pipeline[kind]:
                    assert component in config[kind], f"{name}: {kind} {component} is not defined"
    assert "prometheus" in service["pipelines"]["metrics"]["exporters"]
    assert "debug" in service["pipelines"]["traces"]["exporters"]
    assert "otlp" in overlay["service"]["pipelines"]["traces"]["exporters"]


def test_otel_collector_config_has_one_home():
    config = load(OTEL / "collector.yaml")
    configmap = next(o for o in load_all(K8S / "otel-collector.yaml") if o["kind"] == "ConfigMap")
    assert yaml.safe_load(configmap["data"]["collector.yaml"]) == config
    assert (CHART / "files" / "otel-collector.yaml").read_text() == (OTEL / "collector.yaml").read_text()
    assert (CHART / "files" / "otel-collector.forward.yaml").read_text() == (
        OTEL / "collector.forward.yaml"
    ).read_text()


# --------------------------------------------------------------------------------------------
# docker compose and Dockerfiles


@pytest.fixture(scope="module")
def compose() -> dict:
    return load(COMPOSE)


def test_compose_services(compose):
    services = compose["services"]
    assert set(services) == {"redis", "ray-head", "gateway", "bridge", "otel-collector"}
    for name, service in services.items():
        assert "image" in service or "build" in service, f"{name}: no image or build"
        test = service.get("healthcheck", {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL"), f"{name}: no healthcheck"
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown {dependency}"
        for volume in service.get("volumes", []):
            source = volume["source"] if isinstance(volume, dict) else volume.split(":")[0]
            if not source.startswith((".", "/", "$")):
                assert source in compose.get("volumes", {}), f"{name}: undeclared volume {source}"
            elif isinstance(volume, str) and source.startswith("."):
                assert (ROOT / source).exists(), f"{name}: {source} is missing"
    assert not [name for name, service in services.items() if service.get("profiles")], "all start by default"
    ray_head = services["ray-head"]
    command = " ".join(ray_head["command"])
    assert "serve run" in command and "deploy/serve/config.cpu.yaml" in command
    assert {"9000:9000", "8000:8000"} <= set(ray_head["ports"])
    env = ray_head["environment"]
    assert env["AF_MODEL_PRESET"] == env["AVATAR_FORCING_CONFIG"] == "tiny"
    assert env["REDIS_URL"].startswith("redis://redis:")
    assert env["AF_GRPC_PORT"] == "9000" and env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4317"
    assert ray_head["depends_on"]["redis"]["condition"] == "service_healthy"
    (weights,) = [v for v in ray_head["volumes"] if isinstance(v, dict) and v["target"] == "/weights"]
    assert weights["read_only"] is True
    collector = services["otel-collector"]
    assert any(v.startswith("./deploy/otel/collector.yaml:") for v in collector["volumes"])
    gateway = services["gateway"]
    assert gateway["image"] == ray_head["image"] and gateway["build"] == ray_head["build"], "one image for both"
    assert gateway["depends_on"]["redis"]["condition"] == "service_healthy"
    assert gateway["depends_on"]["ray-head"]["condition"] == "service_started"
    assert f"{GATEWAY_PORT}:{GATEWAY_PORT}" in gateway["ports"]
    assert " ".join(gateway["healthcheck"]["test"]).count(f"http://127.0.0.1:{GATEWAY_PORT}/healthz") == 1
    gateway_env = gateway["environment"]
    assert gateway_env["AF_GATEWAY_SERVE_TARGET"] == f"ray-head:{env['AF_GRPC_PORT']}"
    assert gateway_env["AF_GATEWAY_PUBLIC_GRPC_TARGET"] == "127.0.0.1:9000", "what clients on the host dial"
    assert gateway_env["OTEL_EXPORTER_OTLP_ENDPOINT"] == env["OTEL_EXPORTER_OTLP_ENDPOINT"]
    assert gateway_env["REDIS_URL"] == env["REDIS_URL"]
    for name in ("LIVEKIT_URL", "LIVEKIT_API_KEY", "LIVEKIT_API_SECRET"):
        assert gateway_env[name] == f"${{{name}:-}}", f"{name}: optional, from the host, empty by default"


def _docker_compose() -> list[str] | None:
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=20)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_docker_compose_config_when_the_cli_is_available():
    command = _docker_compose()
    if command is None:
        pytest.skip("no `docker compose` / `docker-compose` CLI here; test_compose_services covers the file")

    def config(env: dict[str, str]) -> subprocess.CompletedProcess:
        return subprocess.run([*command, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True,
                              timeout=60, cwd=ROOT, env=env)  # fmt: skip

    base = {k: v for k, v in os.environ.items() if k not in REQUIRED_COMPOSE_SECRETS}
    result = config(base | {name: "x" * 48 for name in REQUIRED_COMPOSE_SECRETS})
    assert result.returncode == 0, result.stderr
    for missing in REQUIRED_COMPOSE_SECRETS:  # an unset secret stops compose before anything starts
        result = config(base | {name: "x" * 48 for name in REQUIRED_COMPOSE_SECRETS if name != missing})
        assert result.returncode != 0 and missing in result.stderr, missing


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_dockerfiles(name):
    text = (DEPLOY / "docker" / name).read_text()
    stages = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\w+))?", text, re.MULTILINE)
    assert len(stages) >= 2, "multi-stage build"
    assert re.search(r"^COPY --from=build ", text, re.MULTILINE)
    assert re.search(r"^ARG TORCH_VERSION=2\.13\.0$", text, re.MULTILINE)
    assert '"torch==${TORCH_VERSION}"' in text
    user = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert user and user[-1].split(":")[0] not in ("root", "0"), "the image must not run as root"
    assert re.search(r"^HEALTHCHECK ", text, re.MULTILINE)
    for line in re.findall(r"^COPY .*$", text, re.MULTILINE):
        assert "weights" not in line and ".safetensors" not in line, f"weights baked in: {line}"
    if name == "Dockerfile.cpu":
        assert "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    else:
        assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:\S+$", text, re.MULTILINE)
        assert "python3.11" in text, "Ray needs the same Python on every node: 3.11, as in the CPU image"


def test_dockerignore_keeps_weights_and_environments_out():
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    assert "**" in lines, "exclude everything by default"
    included = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert not included & {"weights", ".venv", "out", "tests", ".git"}
    for name in ("Dockerfile.cpu", "Dockerfile.gpu"):
        text = (DEPLOY / "docker" / name).read_text()
        for line in re.findall(r"^COPY (?!--from)(.*)$", text, re.MULTILINE):
            *sources, _destination = [token for token in line.split() if not token.startswith("--")]
            for source in sources:
                assert source.rstrip("/") in included, f"{name} copies {source}, which .dockerignore leaves out"


# --------------------------------------------------------------------------------------------
# Helm chart


@pytest.fixture(scope="module")
def values() -> dict:
    return load(CHART / "values.yaml")


@pytest.fixture(scope="module")
def validator():
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def test_chart_metadata():
    chart = load(CHART / "Chart.yaml")
    assert chart["apiVersion"] == "v2" and chart["name"] == "avatar-forcing"
    for template in ("rayservice.yaml", "serve-grpc-service.yaml", "redis.yaml", "configmap.yaml",
                     "otel-collector.yaml", "weights-pvc.yaml", "networkpolicy.yaml", "servicemonitor.yaml",
                     "gateway.yaml", "bridge.yaml", "_helpers.tpl", "NOTES.txt"):  # fmt: skip
        assert (CHART / "templates" / template).exists(), template


def test_helm_values_validate_against_the_schema(validator, values):
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(values)]
    assert errors == []


def _set(data: dict, path: str, value) -> dict:
    data = copy.deepcopy(data)
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node[key]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return data


_DELETE = object()
INVALID = {
    "negative GPU worker replicas": ("ray.gpuWorkers.maxReplicas", -1),
    "negative CPU worker replicas": ("ray.cpuWorkers.replicas", -2),
    "negative Serve max_replicas": ("serve.deployments.decoder.autoscaling_config.max_replicas", -1),
    "missing image repository": ("image.repository", _DELETE),
    "empty image repository": ("gpuImage.repository", ""),
    "GPU fraction above one GPU": ("serve.deployments.generator.ray_actor_options.num_gpus", 1.5),
    "negative GPU fraction": ("serve.deployments.decoder.ray_actor_options.num_gpus", -0.25),
    "GPU fraction as text": ("serve.deployments.decoder.ray_actor_options.num_gpus", "0.25"),
    "unknown model size": ("model.config", "huge"),
    "unknown top-level key": ("replicaCount", 3),
    "typo in a Serve option": ("serve.deployments.generator.max_ongoing_request", 8),
    "no Redis at all": ("redis.inCluster.enabled", False),
    "fixed replicas and autoscaling": ("serve.deployments.generator.num_replicas", 2),
    "zero GPUs per pod": ("ray.gpuWorkers.gpusPerPod", 0),
    "a Serve deployment missing": ("serve.deployments.motion_encoder", _DELETE),
    "relative weights mount": ("weights.mountPath", "weights"),
    "a Serve client peer with an unknown key": ("networkPolicy.serveClients", [{"podSelectr": {}}]),
    "an empty Serve client peer": ("networkPolicy.serveClients", [{}]),
    "Serve clients as a mapping": ("networkPolicy.serveClients", {"podSelector": {}}),
    "no auth Secret": ("auth.existingSecret.name", ""),
    "auth Secret without a key": ("auth.existingSecret.key", _DELETE),
    "no gateway admin token Secret": ("gateway.adminToken.existingSecret.name", ""),
    "gateway port out of range": ("gateway.port", 70000),
    "gateway port as text": ("gateway.port", "8080"),
    "zero gateway replicas": ("gateway.replicas", 0),
    "typo in a gateway key": ("gateway.replica", 2),
    "gateway public target with a scheme": ("gateway.publicGrpcTarget", "http://serve.example.com:9000"),
    "LiveKit Secret name not a name": ("gateway.livekitSecretName", "LiveKit Secret"),
    "bridge port out of range": ("bridge.port", 0),
    "zero bridge sessions": ("bridge.maxSessions", 0),
    "bridge sessions as text": ("bridge.maxSessions", "8"),
    "zero bridge min replicas": ("bridge.autoscaling.minReplicas", 0),
    "bridge CPU target above 100%": ("bridge.autoscaling.targetCPUUtilizationPercentage", 150),
    "typo in a bridge autoscaling key": ("bridge.autoscaling.maxReplica", 4),
    "bridge grace period too short for its shutdown": ("bridge.terminationGracePeriodSeconds", 5),
    "no LiveKit egress for the bridge": ("bridge.livekitEgress", []),
    "typo in a bridge key": ("bridge.maxSession", 8),
}


@pytest.mark.parametrize("case", list(INVALID), ids=list(INVALID))
def test_helm_schema_rejects_invalid_values(validator, values, case):
    path, value = INVALID[case]
    assert list(validator.iter_errors(_set(values, path, value))), f"{case} was accepted"


def test_helm_schema_accepts_the_documented_alternatives(validator, values):
    external = _set(_set(values, "redis.inCluster.enabled", False), "redis.external.url", "rediss://r:6380/0")
    secret_ref = _set(_set(values, "redis.inCluster.enabled", False), "redis.external.existingSecret.name", "redis")
    host_path = _set(values, "weights.source", "hostPath")
    serve_clients = _set(values, "networkPolicy.serveClients", [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "clients"}},
         "podSelector": {"matchLabels": {"app": "avatar-client"}}},
        {"ipBlock": {"cidr": "10.0.0.0/8"}},
    ])  # fmt: skip
    for alternative in (external, secret_ref, host_path, serve_clients):
        assert [e.message for e in validator.iter_errors(alternative)] == []


def test_helm_serve_values_equal_the_serve_config(values):
    config = load(SERVE_CONFIG)
    serve = values["serve"]
    for name, deployment in deployments_by_name(config).items():
        assert serve["deployments"][name] == {k: v for k, v in deployment.items() if k != "name"}, name
    assert serve["grpcServicerFunctions"] == config["grpc_options"]["grpc_servicer_functions"]
    assert serve["grpcPort"] == config["grpc_options"]["port"]
    assert serve["httpPort"] == config["http_options"]["port"]
    assert serve["proxyLocation"] == config["proxy_location"]
    (app,) = config["applications"]
    assert serve["importPath"] == app["import_path"] and serve["appName"] == app["name"]
    assert values["ray"]["version"] == load(RAYSERVICE)["spec"]["rayClusterConfig"]["rayVersion"]


def test_helm_worker_groups_hold_every_replica_at_max_scale(values):
    ray = values["ray"]

    def group(name: str) -> dict:
        return {**ray[name], "cpus": ray[name]["resources"]["limits"]["cpu"]}

    cpu = group("cpuWorkers") if ray["cpuWorkers"]["enabled"] else None
    check_capacity(values["serve"]["deployments"], cpu, group("gpuWorkers"), ray["gpuWorkers"]["gpusPerPod"])


TEMPLATE_FILES = sorted((CHART / "templates").glob("*"))
VALUES_REF = re.compile(r"\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)")
ALIAS = re.compile(r"(\$[A-Za-z_]\w*)\s*:=\s*\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)")


def template_value_paths() -> dict[str, set[str]]:
    """file -> every values path a template reads (`.Values.a.b`, and `$x.c` after `$x := .Values.a`)."""
    paths: dict[str, set[str]] = {}
    for path in TEMPLATE_FILES:
        text = path.read_text()
        found = {m.group(1)[1:] for m in VALUES_REF.finditer(text)}
        for alias, target in ALIAS.findall(text):
            for m in re.finditer(re.escape(alias) + r"((?:\.[A-Za-z_][A-Za-z0-9_]*)+)", text):
                found.add(target[1:] + m.group(1))
        paths[path.name] = found
    return paths


def _exists(values: dict, dotted: str) -> bool:
    node = values
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return True


def _leaves(data, prefix="") -> list[str]:
    if isinstance(data, dict) and data:
        return [leaf for key, val in data.items() for leaf in _leaves(val, f"{prefix}{key}.")]
    return [prefix.rstrip(".")]


def test_helm_templates_read_only_existing_values(values):
    missing = [
        f"{name}: .Values.{dotted}"
        for name, paths in template_value_paths().items()
        for dotted in sorted(paths)
        if not _exists(values, dotted)
    ]
    assert missing == []


def test_every_helm_value_is_read_by_a_template(values):
    read = set().union(*template_value_paths().values())
    unused = [leaf for leaf in _leaves(values) if not any(leaf == r or leaf.startswith(r + ".") for r in read)]
    assert unused == [], "values no template reads (dead knobs)"


@pytest.mark.parametrize("path", TEMPLATE_FILES, ids=lambda p: p.name)
def test_helm_template_actions_are_balanced(path):
    text = path.read_text()
    assert text.count("{{") == text.count("}}"), "unbalanced {{ }}"
    actions = re.findall(r"\{\{-?\s*(if|range|with|define|else|end)\b", text)
    depth = 0
    for action in actions:
        if action in ("if", "range", "with", "define"):
            depth += 1
        elif action == "end":
            depth -= 1
            assert depth >= 0, "`end` without an opening block"
    assert depth == 0, "a block is not closed"


def test_helm_chart_renders_when_helm_python_is_installed(values):
    """Real Helm rendering (Go template engine) when helm-python-sdk is installed."""
    chart_module = pytest.importorskip("helm_python.chart", reason="helm-python-sdk not installed")
    chart = chart_module.Chart.load(str(CHART))
    chart.validate_schema(values)
    rendered = chart.render(values, name="af", namespace="avatar-forcing", is_install=True)
    docs = [d for name, text in rendered.items() if not name.endswith("NOTES.txt") for d in yaml.safe_load_all(text)]
    docs = [d for d in docs if d]
    (rayservice,) = [d for d in docs if d["kind"] == "RayService"]
    assert yaml.safe_load(rayservice["spec"]["serveConfigV2"]) == load(SERVE_CONFIG)
    kinds = {d["kind"] for d in docs}
    assert {"ConfigMap", "Deployment", "Service", "StatefulSet", "NetworkPolicy"} <= kinds
    # The rendered chart passes the checks the plain manifests pass.
    cluster = rayservice["spec"]["rayClusterConfig"]
    ray_pods = [("ray-head", cluster["headGroupSpec"]["template"])]
    ray_pods += [(g["groupName"], g["template"]) for g in cluster["workerGroupSpecs"]]
    workloads = [(d["metadata"]["name"], d["spec"]["template"]) for d in docs if d["kind"] == "Deployment"]
    gateways = [(n, t) for n, t in workloads if t["metadata"]["labels"]["app.kubernetes.io/component"] == "gateway"]
    assert len(gateways) == 1 and len(ray_pods) == 3
    configmaps = [d for d in docs if d["kind"] == "ConfigMap"]
    assert auth_secret_problems(ray_pods + gateways, configmaps) == []
    ((_, gateway),) = gateways
    check_gateway_pod(gateway, values["gateway"]["port"], values["serve"]["appName"])
    config = next(d for d in configmaps if d["metadata"]["name"].endswith("-config"))["data"]
    check_gateway_settings(gateway["spec"]["containers"][0], config)
    (deployment,) = [d for d in docs if d["kind"] == "Deployment" and d["spec"]["template"] is gateway]
    assert deployment["spec"]["replicas"] == values["gateway"]["replicas"] >= 2
    policies = {d["metadata"]["name"]: d for d in docs if d["kind"] == "NetworkPolicy"}
    labels = gateway["metadata"]["labels"]
    assert admits(policies["af-avatar-forcing-redis"], labels, 6379)
    assert admits(policies["af-avatar-forcing-ray"], labels, values["serve"]["grpcPort"])
    assert admits(policies["af-avatar-forcing-gateway"], {"any": "pod"}, values["gateway"]["port"])
    off = chart.render(_set(values, "gateway.enabled", False), name="af", namespace="avatar-forcing", is_install=True)
    off_docs = [d for n, text in off.items() if not n.endswith("NOTES.txt") for d in yaml.safe_load_all(text) if d]
    assert not [d for d in off_docs if "gateway" in d["metadata"]["name"]], "gateway.enabled=false leaves objects"


def test_ray_workers_run_at_normal_priority_everywhere(compose):
    """Ray starts workers at nice 15 unless told otherwise; every deployment tells it (the launcher does too)."""
    assert compose["services"]["ray-head"]["environment"]["RAY_worker_niceness"] == "0"
    k8s = next(d for d in load_all(ROOT / "deploy/k8s/configmap.yaml") if d["kind"] == "ConfigMap")
    assert k8s["data"]["RAY_worker_niceness"] == "0"
    chart = (ROOT / "helm/avatar-forcing/templates/configmap.yaml").read_text()
    assert 'RAY_worker_niceness: "0"' in chart


# --------------------------------------------------------------------------------------------
# The gateway, and the token secret of every pod that signs or verifies session tokens

GATEWAY_COMMAND = ["python", "-m", "services.gateway"]
GATEWAY_PORT = 8080
AUTH_SECRET = "AVATAR_FORCING_AUTH_SECRET"
ADMIN_TOKEN = "AF_GATEWAY_ADMIN_TOKEN"
REQUIRED_COMPOSE_SECRETS = (AUTH_SECRET, ADMIN_TOKEN)
_REQUIRED_FROM_HOST = re.compile(r"\$\{(?P<name>[A-Z_][A-Z0-9_]*):\?[^}]+\}")


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _serve_app_name(path: Path) -> str:
    (app,) = load(path)["applications"]
    return app["name"]


def _gateway_templates(objects: list[dict]) -> list[tuple[str, dict]]:
    component = "app.kubernetes.io/component"
    return [(n, t) for n, t in _pod_templates(objects) if t["metadata"]["labels"].get(component) == "gateway"]


def auth_secret_problems(pods: list[tuple[str, dict]], configmaps: list[dict]) -> list[str]:
    """Every container of these pods (each signs or verifies session tokens) takes
    AVATAR_FORCING_AUTH_SECRET from a secretKeyRef; a gateway container AF_GATEWAY_ADMIN_TOKEN too,
    and only a gateway has it. Neither may be a literal, a configMapKeyRef or a ConfigMap key."""
    found = []
    for configmap in configmaps:
        for name in (AUTH_SECRET, ADMIN_TOKEN):
            if name in (configmap.get("data") or {}):
                found.append(f"ConfigMap {configmap['metadata']['name']} holds {name}")
    for pod_name, template in pods:
        is_gateway = template["metadata"]["labels"].get("app.kubernetes.io/component") == "gateway"
        for container in template["spec"]["containers"]:
            where = f"{pod_name}/{container['name']}"
            env = _env(container)
            required = (AUTH_SECRET, ADMIN_TOKEN) if is_gateway else (AUTH_SECRET,)
            if not is_gateway and ADMIN_TOKEN in env:
                found.append(f"{where}: has {ADMIN_TOKEN}, which only the gateway needs")
            for name in required:
                entry = env.get(name)
                if entry is None:
                    found.append(f"{where}: no {name}")
                elif "value" in entry:
                    found.append(f"{where}: {name} is a literal")
                else:
                    ref = entry.get("valueFrom", {}).get("secretKeyRef") or {}
                    if not (ref.get("name") and ref.get("key")):
                        found.append(f"{where}: {name} is not from a Secret ({entry.get('valueFrom')})")
    return found


def admits(policy: dict, labels: dict, port: int) -> bool:
    """Whether a NetworkPolicy's ingress lets a pod with these labels (same namespace) in on port."""
    for rule in policy["spec"].get("ingress", []):
        if rule.get("ports") and port not in [p.get("port") for p in rule["ports"]]:
            continue
        if "from" not in rule:
            return True
        for peer in rule["from"]:
            if "podSelector" in peer and _selects(peer["podSelector"], labels):
                return True
            if "podSelector" not in peer and peer.get("namespaceSelector") == {}:
                return True
    return False


def check_gateway_pod(template: dict, port, app_name: str) -> None:
    """The gateway's pod: command, port, probes, settings and hardening, wherever it is deployed."""
    from services.gateway.routes.health import router

    (container,) = template["spec"]["containers"]
    assert container["args"] == GATEWAY_COMMAND and "command" not in container, "args keep tini as PID 1"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": port}
    routes = {route.path for route in router.routes}
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        assert container[probe]["httpGet"] == {"path": path, "port": "http"}, probe
        assert path in routes, f"the gateway has no {path}"
    env = _env(container)
    assert env["AF_GATEWAY_HOST"]["value"] == "0.0.0.0"
    assert env["AF_GATEWAY_PORT"]["value"] == str(port)
    assert env["AF_GATEWAY_SERVE_APP"]["value"] == app_name, "/readyz and routing need the Serve app's name"
    assert env["AF_GATEWAY_SERVE_TARGET"]["value"].endswith(f"-serve-grpc:{load(SERVE_CONFIG)['grpc_options']['port']}")
    assert template["spec"]["securityContext"]["runAsNonRoot"] is True
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    (tmp,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    assert "emptyDir" in volumes[tmp["name"]], "uploads may spool to /tmp: a writable emptyDir"
    assert container["resources"]["requests"] and container["resources"]["limits"]


def check_gateway_settings(container: dict, config: dict[str, str]):
    """GatewaySettings as the container would build them (Secrets replaced by stand-ins)."""
    from services.gateway.settings import GatewaySettings

    env = dict(config)
    for entry in container["env"]:
        env[entry["name"]] = entry.get("value", "s" * 48)  # valueFrom: a Secret's stand-in
    settings = GatewaySettings.from_env(env)
    assert (settings.host, settings.port) == ("0.0.0.0", int(env["AF_GATEWAY_PORT"]))
    assert settings.livekit is None, "LiveKit comes only from its optional Secret"
    return settings


def gateway_variables_read() -> set[str]:
    """The AF_GATEWAY_* variables services/gateway/settings.py reads."""
    text = (ROOT / "services" / "gateway" / "settings.py").read_text()
    names = set(re.findall(r"\"(AF_GATEWAY_[A-Z0-9_]+)\"", text))
    assert ADMIN_TOKEN in names and "AF_GATEWAY_SERVE_TARGET" in names, "settings.py changed shape"
    return names


def _compose_value(value: str) -> str:
    """Compose interpolation, with the required secrets replaced by stand-ins."""
    value = _REQUIRED_FROM_HOST.sub(lambda m: "s" * 48, value)
    value = re.sub(r"\$\{[A-Z_][A-Z0-9_]*:\+[^}]*\}", "", value)
    return re.sub(r"\$\{[A-Z_][A-Z0-9_]*:-([^}]*)\}", lambda m: m.group(1), value)


def _chart_template_as_yaml(text: str) -> list[dict]:
    """A chart template with its actions blanked: action-only lines dropped, inline ones "HELM"."""
    text = re.sub(r"\{\{-?\s*/\*.*?\*/\s*-?\}\}", "", text, flags=re.DOTALL)
    lines = [line for line in text.splitlines() if not re.fullmatch(r"\s*(\{\{.*?\}\}\s*)+", line)]
    return [d for d in yaml.safe_load_all(re.sub(r"\{\{.*?\}\}", "HELM", "\n".join(lines))) if d]


def test_gateway_runs_the_same_in_compose_k8s_and_the_chart(compose, k8s_objects, values):
    # docker compose
    gateway = compose["services"]["gateway"]
    assert gateway["command"] == GATEWAY_COMMAND
    env = gateway["environment"]
    assert env["AF_GATEWAY_HOST"] == "0.0.0.0" and env["AF_GATEWAY_PORT"] == str(GATEWAY_PORT)
    assert env["AF_GATEWAY_SERVE_APP"] == _serve_app_name(SERVE_CONFIG_CPU)
    # plain manifests: two replicas behind a Service on the named port
    ((name, template),) = _gateway_templates(k8s_objects)
    deployment = next(o for o in k8s_objects if o["kind"] == "Deployment" and o["metadata"]["name"] == name)
    assert deployment["spec"]["replicas"] == 2, "stateless: two replicas, Redis holds limits and quotas"
    check_gateway_pod(template, GATEWAY_PORT, _serve_app_name(SERVE_CONFIG))
    services = {o["metadata"]["name"]: o for o in k8s_objects if o["kind"] == "Service"}
    assert services["avatar-forcing-gateway"]["spec"]["ports"] == [
        {"name": "http", "port": GATEWAY_PORT, "targetPort": "http"}
    ]
    (container,) = template["spec"]["containers"]
    target = _env(container)["AF_GATEWAY_SERVE_TARGET"]["value"]
    service_name, service_port = target.rsplit(":", 1)
    assert int(service_port) in [p["port"] for p in services[service_name]["spec"]["ports"]], target
    # the chart: the same container, with values in place of the literals
    g = values["gateway"]
    assert g["enabled"] is True and g["port"] == GATEWAY_PORT and g["replicas"] == 2
    text = (CHART / "templates" / "gateway.yaml").read_text()
    chart_deployment, chart_service = _chart_template_as_yaml(text)
    assert (chart_deployment["kind"], chart_service["kind"]) == ("Deployment", "Service")
    (chart_container,) = chart_deployment["spec"]["template"]["spec"]["containers"]
    assert chart_container["args"] == GATEWAY_COMMAND and "command" not in chart_container
    for key in ("readinessProbe", "livenessProbe", "securityContext", "volumeMounts"):
        assert chart_container[key] == container[key], key
    assert chart_deployment["spec"]["template"]["spec"]["volumes"] == template["spec"]["volumes"]
    chart_env = set(_env(chart_container)) | {AUTH_SECRET}  # the auth entry comes from a helper
    assert chart_env == set(_env(container)), "the chart and the manifests set the same variables"
    assert 'include "avatar-forcing.authSecretEnv" .' in text
    assert re.search(r"name: AF_GATEWAY_SERVE_APP\n\s+value: \{\{ \.Values\.serve\.appName \| quote \}\}", text)
    assert re.search(r"name: AF_GATEWAY_PORT\n\s+value: \{\{ \$g\.port \| quote \}\}", text)
    assert re.search(r"containerPort: \{\{ \$g\.port \}\}", text)


def test_gateway_settings_parse_as_deployed(compose, k8s_objects):
    compose_env = {k: _compose_value(str(v)) for k, v in compose["services"]["gateway"]["environment"].items()}
    settings = check_gateway_settings({"env": [{"name": k, "value": v} for k, v in compose_env.items()]}, {})
    assert settings.serve_target == "ray-head:9000" and settings.public_grpc_target == "127.0.0.1:9000"
    assert settings.serve_app == _serve_app_name(SERVE_CONFIG_CPU)
    config = next(o for o in k8s_objects if o["metadata"]["name"] == "avatar-forcing-config")["data"]
    ((_, template),) = _gateway_templates(k8s_objects)
    settings = check_gateway_settings(template["spec"]["containers"][0], config)
    assert settings.service.redis_url == config["REDIS_URL"]
    # Every AF_GATEWAY_* a deployment sets is one the gateway reads (a typo would be ignored silently).
    read = gateway_variables_read()
    chart_text = (CHART / "templates" / "gateway.yaml").read_text()
    for where, names in (
        ("docker-compose.yml", set(compose_env)),
        ("deploy/k8s/gateway.yaml", set(_env(template["spec"]["containers"][0]))),
        ("the chart", set(re.findall(r"name: (AF_GATEWAY_[A-Z0-9_]+)", chart_text))),
    ):
        unknown = {n for n in names if n.startswith("AF_GATEWAY_")} - read
        assert not unknown, f"{where}: {sorted(unknown)} are not read by services/gateway/settings.py"


def test_every_token_verifier_gets_the_auth_secret_from_a_secret(k8s_objects):
    pods = [(f"ray-{i}", t) for i, t in enumerate(_ray_pod_templates())] + _gateway_templates(k8s_objects)
    assert len(pods) == 4
    assert auth_secret_problems(pods, [o for o in k8s_objects if o["kind"] == "ConfigMap"]) == []
    # ... and that Secret is the one secret.example.yaml documents, with both keys.
    examples = {o["metadata"]["name"]: o["stringData"] for o in load_all(K8S / "secret.example.yaml")}
    assert {AUTH_SECRET, ADMIN_TOKEN} <= set(examples["avatar-forcing-auth"])
    assert set(examples["avatar-forcing-livekit"]) == {"LIVEKIT_URL", "LIVEKIT_API_KEY", "LIVEKIT_API_SECRET"}
    for _, template in pods:
        for name, entry in _env(template["spec"]["containers"][0]).items():
            if name in (AUTH_SECRET, ADMIN_TOKEN):
                assert entry["valueFrom"]["secretKeyRef"] == {"name": "avatar-forcing-auth", "key": name}
    ((_, gateway),) = _gateway_templates(k8s_objects)
    assert {"name": "avatar-forcing-livekit", "optional": True} in [
        e.get("secretRef") for e in gateway["spec"]["containers"][0]["envFrom"]
    ]


def test_every_token_verifier_gets_the_auth_secret_from_a_secret_in_compose_and_the_chart(compose, values):
    services = compose["services"]
    for name in ("ray-head", "gateway"):
        match = _REQUIRED_FROM_HOST.fullmatch(str(services[name]["environment"][AUTH_SECRET]))
        assert match and match.group("name") == AUTH_SECRET, f"{name}: {AUTH_SECRET} must be required from the host"
    match = _REQUIRED_FROM_HOST.fullmatch(str(services["gateway"]["environment"][ADMIN_TOKEN]))
    assert match and match.group("name") == ADMIN_TOKEN
    assert ADMIN_TOKEN not in services["ray-head"]["environment"], "only the gateway holds the admin token"
    for name in ("redis", "otel-collector", "bridge"):  # the bridge's orders carry its tokens
        assert AUTH_SECRET not in services[name].get("environment", {}), name
    # The chart: each Ray container and the gateway include the Secret helper; nothing sets it otherwise.
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    helper = re.search(r'define "avatar-forcing.authSecretEnv" -\}\}(.*?)\{\{- end', helpers, re.DOTALL).group(1)
    assert yaml.safe_load(re.sub(r"\{\{.*?\}\}", "HELM", helper)) == [
        {"name": AUTH_SECRET, "valueFrom": {"secretKeyRef": {"name": "HELM", "key": "HELM"}}}
    ]
    assert ".Values.auth.existingSecret.name" in helper and ".Values.auth.existingSecret.key" in helper
    rayservice = (CHART / "templates" / "rayservice.yaml").read_text()
    containers = re.findall(r"^\s+- name: ray-(?:head|worker)$", rayservice, re.MULTILINE)
    assert len(containers) == 3
    assert rayservice.count('include "avatar-forcing.authSecretEnv" .') == len(containers)
    for path in TEMPLATE_FILES:
        text = path.read_text()
        if path.name != "_helpers.tpl":
            assert f"name: {AUTH_SECRET}" not in text, f"{path.name}: sets {AUTH_SECRET} itself, not via the helper"
        for name in (AUTH_SECRET, ADMIN_TOKEN):
            assert not re.search(rf"^\s*{name}\s*:", text, re.MULTILINE), f"{path.name}: {name} as a ConfigMap key"
            for match in re.finditer(rf"name: {name}\n(\s+)(\S+)", text):
                assert match.group(2) == "valueFrom:", f"{path.name}: {name} is not from a Secret"
    assert values["auth"]["existingSecret"] == {"name": "avatar-forcing-auth", "key": AUTH_SECRET}
    assert values["gateway"]["adminToken"]["existingSecret"] == {"name": "avatar-forcing-auth", "key": ADMIN_TOKEN}


def test_network_policies_admit_the_gateway(k8s_objects):
    policies = {o["metadata"]["name"]: o for o in k8s_objects if o["kind"] == "NetworkPolicy"}
    ((_, gateway),) = _gateway_templates(k8s_objects)
    labels = gateway["metadata"]["labels"]
    assert admits(policies["avatar-forcing-redis"], labels, 6379), "the gateway keeps its state in Redis"
    assert admits(policies["avatar-forcing-ray"], labels, 9000), "the gateway calls Serve's gRPC proxy"
    policy = policies["avatar-forcing-gateway"]
    assert _selects(policy["spec"]["podSelector"], labels)
    assert admits(policy, {"app": "an-ingress-controller"}, GATEWAY_PORT), "the API is reachable"
    assert not admits(policy, {"app": "an-ingress-controller"}, 9000), "only the API port is open"


def test_the_gateway_checks_can_fail():
    from_configmap = {"configMapKeyRef": {"name": "cm", "key": AUTH_SECRET}}
    ray = {"metadata": {"labels": {"app.kubernetes.io/component": "ray"}},
           "spec": {"containers": [{"name": "c", "env": [{"name": AUTH_SECRET, "value": "x" * 48}]}]}}  # fmt: skip
    gateway_env = [{"name": AUTH_SECRET, "valueFrom": from_configmap}]
    gateway = {"metadata": {"labels": {"app.kubernetes.io/component": "gateway"}},
               "spec": {"containers": [{"name": "c", "env": gateway_env}]}}  # fmt: skip
    configmap = {"metadata": {"name": "cm"}, "data": {AUTH_SECRET: "x" * 48}}
    problems = auth_secret_problems([("ray", ray), ("gw", gateway)], [configmap])
    assert problems == [
        f"ConfigMap cm holds {AUTH_SECRET}",
        f"ray/c: {AUTH_SECRET} is a literal",
        f"gw/c: {AUTH_SECRET} is not from a Secret ({{'configMapKeyRef': {{'name': 'cm', 'key': '{AUTH_SECRET}'}}}})",
        f"gw/c: no {ADMIN_TOKEN}",
    ]
    ray["spec"]["containers"][0]["env"] = [
        {"name": ADMIN_TOKEN, "valueFrom": {"secretKeyRef": {"name": "a", "key": "b"}}}
    ]
    assert auth_secret_problems([("ray", ray)], []) == [
        f"ray/c: has {ADMIN_TOKEN}, which only the gateway needs",
        f"ray/c: no {AUTH_SECRET}",
    ]
    closed = {"spec": {"ingress": [{"from": [{"podSelector": {"matchLabels": {"component": "ray"}}}]}]}}
    assert not admits(closed, {"component": "gateway"}, 9000) and admits(closed, {"component": "ray"}, 9000)
    assert _compose_value("${A:?set A}/${B:-b}/${C:+c}") == "s" * 48 + "/b/"


# --------------------------------------------------------------------------------------------
# The LiveKit bridge: its own Deployment, scaled by its own HorizontalPodAutoscaler

BRIDGE_COMMAND = ["python", "-m", "services.bridge"]
BRIDGE_PORT = 8095
# SIGTERM: the worker ends every session it holds (BridgeSession: playback reports within
# drain_s, 1 s for the end of input, then the stream closed and the room left), all at once.
# What a pod's grace period must leave it after its preStop hook (and compose's stop_grace_period).
BRIDGE_SHUTDOWN_S = 30


def _bridge_templates(objects: list[dict]) -> list[tuple[str, dict]]:
    component = "app.kubernetes.io/component"
    return [(n, t) for n, t in _pod_templates(objects) if t["metadata"]["labels"].get(component) == "bridge"]


def bridge_variables_read() -> set[str]:
    """The variables services/bridge/worker.py reads (WorkerSettings.from_env)."""
    text = (ROOT / "services" / "bridge" / "worker.py").read_text()
    names = set(re.findall(r"(?:environ\.get|_env_int)\(\s*\"([A-Z][A-Z0-9_]*)\"", text))
    expected = {"REDIS_URL", "AF_REDIS_PREFIX", "AF_BRIDGE_ID", "AF_BRIDGE_MAX_SESSIONS", "AF_BRIDGE_PORT",
                "AF_BRIDGE_GRPC_TARGET", "AF_BRIDGE_CLAIM_IDLE_MS"}  # fmt: skip
    assert expected <= names, f"worker.py changed shape: {sorted(names)}"
    return names


def bridge_settings(env: dict[str, str], monkeypatch):
    """WorkerSettings as the container would build them from this environment."""
    from services.bridge.worker import WorkerSettings

    for name in bridge_variables_read():
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return WorkerSettings.from_env()


def _pre_stop_s(container: dict) -> float:
    hook = container.get("lifecycle", {}).get("preStop")
    if not hook:
        return 0.0
    if "sleep" in hook:
        return float(hook["sleep"]["seconds"])
    command = hook["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, f"preStop is not a plain sleep: {command}"
    return float(command[1])


def check_bridge_pod(template: dict, port) -> None:
    """The bridge's pod: command, port, probes, identity, no token secret, hardening."""
    (container,) = template["spec"]["containers"]
    assert container["args"] == BRIDGE_COMMAND and "command" not in container, "args keep tini as PID 1"
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"http": port}
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "http"}, probe
    env = _env(container)
    assert env["AF_BRIDGE_PORT"]["value"] == str(port)
    assert env["AF_BRIDGE_ID"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}, "one consumer per pod"
    grpc_port = load(SERVE_CONFIG)["grpc_options"]["port"]
    assert env["AF_BRIDGE_GRPC_TARGET"]["value"].endswith(f"-serve-grpc:{grpc_port}"), "the in-cluster Service"
    assert int(env["AF_BRIDGE_MAX_SESSIONS"]["value"]) >= 1
    assert not {AUTH_SECRET, ADMIN_TOKEN} & set(env), "the bridge holds no token secret: orders carry tokens"
    secrets = [e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e]
    assert not [n for n in secrets if "auth" in n or "livekit" in n], secrets
    assert template["spec"]["securityContext"]["runAsNonRoot"] is True
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    (tmp,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    assert "emptyDir" in volumes[tmp["name"]]
    resources = container["resources"]
    assert resources["requests"]["cpu"] and resources["limits"], "the HPA's CPU target is relative to the request"
    assert template["spec"]["terminationGracePeriodSeconds"] - _pre_stop_s(container) >= BRIDGE_SHUTDOWN_S


def check_bridge_hpa(hpa: dict, deployment: dict) -> None:
    assert hpa["apiVersion"] == "autoscaling/v2" and hpa["kind"] == "HorizontalPodAutoscaler"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["type"] == "Utilization"
    utilization = metric["resource"]["target"]["averageUtilization"]
    assert utilization == HELM_VALUE or 0 < int(utilization) <= 100


HELM_VALUE = "HELM"  # what _chart_template_as_yaml leaves of an inline action


def allows_egress(policy: dict, labels: dict, port: int) -> bool:
    """Whether a NetworkPolicy's egress lets its pods out to a pod with these labels (same namespace) on port."""
    if "Egress" not in policy["spec"].get("policyTypes", []):
        return True
    for rule in policy["spec"].get("egress", []):
        if rule.get("ports") and port not in [p.get("port") for p in rule["ports"]]:
            continue
        if "to" not in rule:
            return True
        if any("podSelector" in peer and _selects(peer["podSelector"], labels) for peer in rule["to"]):
            return True
    return False


def check_bridge_network_policies(policies: dict[str, dict], prefix: str, bridge: dict, pods: dict[str, dict],
                                  serve_grpc_port: int, port: int) -> None:  # fmt: skip
    labels = bridge["metadata"]["labels"]
    assert admits(policies[f"{prefix}-redis"], labels, 6379), "the bridge reads the dispatch stream"
    assert admits(policies[f"{prefix}-ray"], labels, serve_grpc_port), "the bridge streams sessions to Serve"
    policy = policies[f"{prefix}-bridge"]
    assert _selects(policy["spec"]["podSelector"], labels)
    assert admits(policy, {"app": "prometheus"}, port), "probes and metrics"
    assert not admits(policy, {"app": "prometheus"}, serve_grpc_port), "only the probe port is open"
    assert allows_egress(policy, pods["redis"], 6379) and allows_egress(policy, pods["ray"], serve_grpc_port)
    assert not allows_egress(policy, pods["gateway"], GATEWAY_PORT), "nothing else in the cluster"
    assert not allows_egress(policy, pods["ray"], 8265), "not the Ray dashboard (it runs code)"
    blocks = [peer["ipBlock"] for rule in policy["spec"]["egress"] for peer in rule.get("to", []) if "ipBlock" in peer]
    assert {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"]} in blocks, "LiveKit"
    dns = [r for r in policy["spec"]["egress"] if "to" not in r]
    assert dns and {p["port"] for r in dns for p in r["ports"]} == {53}, "DNS, and only DNS, to anywhere"


def test_bridge_runs_the_same_in_compose_k8s_and_the_chart(compose, k8s_objects, values, monkeypatch):
    # docker compose: one image, scalable (no published port), no token secret
    services = compose["services"]
    bridge, gateway = services["bridge"], services["gateway"]
    assert bridge["command"] == BRIDGE_COMMAND
    assert bridge["image"] == gateway["image"] and bridge["build"] == gateway["build"], "one image"
    assert "ports" not in bridge, "`docker compose up --scale bridge=N` needs no host port"
    assert bridge["expose"] == [str(BRIDGE_PORT)]
    assert bridge["depends_on"]["redis"]["condition"] == "service_healthy"
    assert bridge["depends_on"]["ray-head"]["condition"] == "service_started"
    assert " ".join(bridge["healthcheck"]["test"]).count(f"http://127.0.0.1:{BRIDGE_PORT}/healthz") == 1
    assert bridge["read_only"] is True and bridge["tmpfs"] == ["/tmp"] and bridge["volumes"] == []
    assert quantity(bridge["stop_grace_period"].rstrip("s")) >= BRIDGE_SHUTDOWN_S
    env = {k: _compose_value(str(v)) for k, v in bridge["environment"].items()}
    assert "AF_BRIDGE_ID" not in env, "each container names itself (bridge-<hostname>-<pid>)"
    gateway_env = gateway["environment"]
    assert env["REDIS_URL"] == gateway_env["REDIS_URL"] and env["AF_REDIS_PREFIX"] == gateway_env["AF_REDIS_PREFIX"]
    settings = bridge_settings(env, monkeypatch)
    assert (settings.port, settings.redis_url, settings.redis_prefix) == (BRIDGE_PORT, env["REDIS_URL"], "af")
    # the gateway hands out the host's 127.0.0.1:9000; inside compose the bridge dials ray-head
    assert settings.grpc_target == gateway_env["AF_GATEWAY_SERVE_TARGET"] == "ray-head:9000"
    # plain manifests: a Deployment the HPA scales, a Service for probes and metrics
    ((name, template),) = _bridge_templates(k8s_objects)
    deployment = next(o for o in k8s_objects if o["kind"] == "Deployment" and o["metadata"]["name"] == name)
    check_bridge_pod(template, BRIDGE_PORT)
    (hpa,) = [o for o in k8s_objects if o["kind"] == "HorizontalPodAutoscaler"]
    check_bridge_hpa(hpa, deployment)
    assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"], "two pods survive one dying"
    services_k8s = {o["metadata"]["name"]: o for o in k8s_objects if o["kind"] == "Service"}
    assert services_k8s["avatar-forcing-bridge"]["spec"]["ports"] == [
        {"name": "http", "port": BRIDGE_PORT, "targetPort": "http"}
    ]
    (container,) = template["spec"]["containers"]
    target = _env(container)["AF_BRIDGE_GRPC_TARGET"]["value"]
    service_name, service_port = target.rsplit(":", 1)
    assert int(service_port) in [p["port"] for p in services_k8s[service_name]["spec"]["ports"]], target
    config = next(o for o in k8s_objects if o["metadata"]["name"] == "avatar-forcing-config")["data"]
    assert {"configMapRef": {"name": "avatar-forcing-config"}} in container["envFrom"], "REDIS_URL, AF_REDIS_PREFIX"
    k8s_env = {**config, **{e["name"]: e.get("value", "bridge-0") for e in container["env"]}}
    settings = bridge_settings({k: v for k, v in k8s_env.items() if k in bridge_variables_read()}, monkeypatch)
    assert (settings.redis_url, settings.redis_prefix, settings.bridge_id) == (config["REDIS_URL"], "af", "bridge-0")
    assert settings.port == BRIDGE_PORT and settings.grpc_target == target
    # the chart: the same container and autoscaler, with values in place of the literals
    b = values["bridge"]
    assert b["enabled"] is True and b["port"] == BRIDGE_PORT
    assert b["maxSessions"] == int(_env(container)["AF_BRIDGE_MAX_SESSIONS"]["value"])
    assert b["resources"] == container["resources"]
    assert b["terminationGracePeriodSeconds"] == template["spec"]["terminationGracePeriodSeconds"]
    scaling = b["autoscaling"]
    assert (scaling["minReplicas"], scaling["maxReplicas"]) == (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"])
    assert (
        scaling["targetCPUUtilizationPercentage"]
        == hpa["spec"]["metrics"][0]["resource"]["target"]["averageUtilization"]
    )
    scale_down = hpa["spec"]["behavior"]["scaleDown"]
    assert scaling["scaleDownStabilizationSeconds"] == scale_down["stabilizationWindowSeconds"]
    text = (CHART / "templates" / "bridge.yaml").read_text()
    chart_deployment, chart_service, chart_hpa = _chart_template_as_yaml(text)
    assert (chart_deployment["kind"], chart_service["kind"]) == ("Deployment", "Service")
    check_bridge_hpa(chart_hpa, chart_deployment)
    assert chart_hpa["spec"]["behavior"] == {**hpa["spec"]["behavior"], "scaleDown": {
        **hpa["spec"]["behavior"]["scaleDown"], "stabilizationWindowSeconds": "HELM"}}  # fmt: skip
    (chart_container,) = chart_deployment["spec"]["template"]["spec"]["containers"]
    assert chart_container["args"] == BRIDGE_COMMAND and "command" not in chart_container
    for key in ("readinessProbe", "livenessProbe", "securityContext", "volumeMounts", "lifecycle"):
        assert chart_container[key] == container[key], key
    assert chart_deployment["spec"]["template"]["spec"]["volumes"] == template["spec"]["volumes"]
    assert set(_env(chart_container)) == set(_env(container)), "the chart and the manifests set the same variables"
    assert _env(chart_container)["AF_BRIDGE_ID"] == _env(container)["AF_BRIDGE_ID"]
    assert chart_service["spec"]["ports"] == [{"name": "http", "port": "HELM", "targetPort": "http"}]
    assert re.search(r"name: AF_BRIDGE_PORT\n\s+value: \{\{ \$b\.port \| quote \}\}", text)
    assert re.search(r"name: AF_BRIDGE_MAX_SESSIONS\n\s+value: \{\{ \$b\.maxSessions \| quote \}\}", text)
    assert re.search(r"containerPort: \{\{ \$b\.port \}\}", text)
    assert 'printf "%s-serve-grpc:%v" $fullname .Values.serve.grpcPort' in text
    assert 'include "avatar-forcing.redisEnv" .' in text and "authSecretEnv" not in text
    assert re.search(r"^\s+AF_REDIS_PREFIX: \"af\"", (CHART / "templates" / "configmap.yaml").read_text(), re.M)
    # Every variable a deployment sets is one the worker reads (a typo would be ignored silently).
    read = bridge_variables_read()
    for where, names in (
        ("docker-compose.yml", set(env)),
        ("deploy/k8s/bridge.yaml", set(_env(container))),
        ("the chart", set(re.findall(r"name: ([A-Z][A-Z0-9_]+)\n\s+value", text)) | set(_env(chart_container))),
    ):
        assert not names - read, f"{where}: {sorted(names - read)} are not read by services/bridge/worker.py"


def test_network_policies_let_the_bridge_out_to_redis_serve_and_livekit_only(k8s_objects):
    policies = {o["metadata"]["name"]: o for o in k8s_objects if o["kind"] == "NetworkPolicy"}
    ((_, bridge),) = _bridge_templates(k8s_objects)
    pods = {t["metadata"]["labels"]["app.kubernetes.io/component"]: t["metadata"]["labels"]
            for _, t in _pod_templates(k8s_objects)}  # fmt: skip
    pods["ray"] = _ray_pod_templates()[0]["metadata"]["labels"]
    grpc_port = load(SERVE_CONFIG)["grpc_options"]["port"]
    check_bridge_network_policies(policies, "avatar-forcing", bridge, pods, grpc_port, BRIDGE_PORT)
    # The others' egress stays open (the bridge's policy is the only one with Egress).
    assert [n for n, p in policies.items() if "Egress" in p["spec"]["policyTypes"]] == ["avatar-forcing-bridge"]


def test_chart_bridge_network_policy_matches_the_manifests():
    text = (CHART / "templates" / "networkpolicy.yaml").read_text()
    block = text[text.index("{{- if .Values.bridge.enabled }}") :]
    (policy,) = _chart_template_as_yaml(block.split("---", 1)[1])
    plain = next(d for d in load_all(K8S / "networkpolicy.yaml") if d["metadata"]["name"] == "avatar-forcing-bridge")
    assert policy["spec"]["policyTypes"] == plain["spec"]["policyTypes"] == ["Ingress", "Egress"]
    # In-cluster and external Redis are both rendered (the template's if/else), DNS and Serve as in the manifests.
    assert plain["spec"]["egress"][0] in policy["spec"]["egress"]
    assert "toYaml .Values.bridge.livekitEgress" in block
    assert load(CHART / "values.yaml")["bridge"]["livekitEgress"] == plain["spec"]["egress"][-1]["to"]


def test_the_bridge_checks_can_fail():
    closed = {"spec": {"policyTypes": ["Egress"], "egress": [
        {"to": [{"podSelector": {"matchLabels": {"component": "redis"}}}], "ports": [{"port": 6379}]}]}}  # fmt: skip
    assert allows_egress(closed, {"component": "redis"}, 6379)
    assert not allows_egress(closed, {"component": "redis"}, 6380) and not allows_egress(closed, {"c": "x"}, 6379)
    assert allows_egress({"spec": {"policyTypes": ["Ingress"]}}, {"c": "x"}, 1), "no Egress: open"
    deployment = {"metadata": {"name": "b"}, "spec": {"replicas": 2}}
    target = {"apiVersion": "apps/v1", "kind": "Deployment", "name": "b"}
    hpa = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
           "spec": {"scaleTargetRef": target, "metrics": []}}  # fmt: skip
    with pytest.raises(AssertionError, match="the HPA owns"):
        check_bridge_hpa(hpa, deployment)
    with pytest.raises(AssertionError):
        check_bridge_hpa({**hpa, "spec": {**hpa["spec"], "scaleTargetRef": {"kind": "Deployment", "name": "x"}}},
                         {"metadata": {"name": "b"}, "spec": {}})  # fmt: skip
    assert _pre_stop_s({"lifecycle": {"preStop": {"exec": {"command": ["sleep", "5"]}}}}) == 5
    assert _pre_stop_s({}) == 0
