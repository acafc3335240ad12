"""k8s/: every overlay renders with kustomize, every rendered object is valid against the
Kubernetes schemas (offline, the kubernetes-validate package's bundled schemas), and the
things the deployment promises hold in what would actually be applied.

KEDA's ScaledObject / TriggerAuthentication and the Prometheus operator's ServiceMonitor /
PrometheusRule are custom resources: kubernetes-validate has no schema for them, so they get
a structural check of our own here (the fields aqsh relies on, their types, and that what they
reference exists in the same render)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import click
import kubernetes_validate
import pytest
import yaml

from aqsh.cli import cli
from aqsh.durations import parse_duration
from aqsh.engine.keys import queue_keys
from aqsh.runner.spec import load_tasks
from aqsh.settings import _FIELDS
from tests.deploy.conftest import (
    COMPONENTS,
    K8S,
    OVERLAYS,
    ROOT,
    by_kind,
    env_of,
    render_overlay,
    render_with_component,
)

#: The Kubernetes versions the manifests must be valid for: an older supported one and the
#: newest the package knows.
K8S_VERSIONS = ("1.29", kubernetes_validate.latest_version())
CUSTOM_KINDS = {"ScaledObject", "TriggerAuthentication", "ServiceMonitor", "PrometheusRule"}
SETTINGS = {f"AQSH_{suffix}" for suffix in _FIELDS}


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render_overlay(request.param)


def _renders(tmp_path: Path) -> list[tuple[str, list[dict[str, Any]]]]:
    return [(o, render_overlay(o)) for o in OVERLAYS] + [
        (c, render_with_component(c, tmp_path)) for c in COMPONENTS]


# ---------------------------------------------------------------------------- schemas
def test_every_rendered_object_is_valid(tmp_path: Path) -> None:
    for name, docs in _renders(tmp_path):
        kinds = {d["kind"] for d in docs}
        assert kinds >= CUSTOM_KINDS, name
        for doc in docs:
            if doc["kind"] in CUSTOM_KINDS:
                continue
            for version in K8S_VERSIONS:
                # strict: a field the schema does not know (a typo, a wrong level) is an error.
                kubernetes_validate.validate(doc, version, strict=True)


def test_the_validator_refuses_a_misspelt_field() -> None:
    """The schema check above is not vacuous: the same validator refuses a field at the
    wrong place and a value of the wrong type."""
    api = by_kind(render_overlay("dev"), "Deployment")["aqsh-api"]
    container = api["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(api, K8S_VERSIONS[0], strict=True)
    hpa = by_kind(render_overlay("dev"), "HorizontalPodAutoscaler")["aqsh-api"]
    hpa["spec"]["minReplicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(hpa, K8S_VERSIONS[0], strict=True)


# ---------------------------------------------------------------------------- settings
def test_every_env_var_named_is_a_real_aqsh_setting(tmp_path: Path) -> None:
    """An env var aqsh does not read is a setting silently not applied; a misspelt one would
    never fail anywhere else. Rendered env lists, and every AQSH_* word in the files
    (comments included: they tell people what to set)."""
    for name, docs in _renders(tmp_path):
        for deployment in by_kind(docs, "Deployment").values():
            for var in env_of(deployment):
                assert var in SETTINGS, f"{name}: {var} is not an aqsh setting"
    # Free text may also name the command line's variables (a how-to in a comment) and the
    # ones the worker gives scripts (tasks.yaml descriptions), each read from aqsh itself.
    known = SETTINGS | _cli_envvars() | _script_envvars()
    files = [*K8S.rglob("*.yaml"), ROOT / "skaffold.yaml", *(ROOT / "deploy").rglob("*.*")]
    mentioned = {(p.relative_to(ROOT), word) for p in files
                 for word in re.findall(r"\bAQSH_[A-Z0-9_]+", p.read_text())}
    assert mentioned
    unknown = sorted((str(p), w) for p, w in mentioned if w not in known)
    assert unknown == []


def _cli_envvars() -> set[str]:
    names: set[str] = set()

    def walk(command: click.Command) -> None:
        for param in command.params:
            envvar = getattr(param, "envvar", None)
            names.update([envvar] if isinstance(envvar, str) else envvar or [])
        if isinstance(command, click.Group):
            for sub in command.commands.values():
                walk(sub)

    walk(cli)
    assert "AQSH_URL" in names
    return names


def _script_envvars() -> set[str]:
    text = "".join(p.read_text() for p in (ROOT / "aqsh" / "runner").glob("*.py"))
    names = set(re.findall(r'"(AQSH_[A-Z0-9_]+)"', text))
    assert "AQSH_RESULT_FILE" in names
    return names


def test_the_settings_check_would_catch_a_wrong_name() -> None:
    assert "AQSH_REDIS_PASSWORD_FILE" in SETTINGS
    assert "AQSH_REDIS_PASSWORD_PATH" not in SETTINGS
    assert "AQSH_SHUTDOWN_TIMEOUT" in SETTINGS


# ---------------------------------------------------------------------------- workloads
def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def _dockerfile_uid() -> int:
    text = (ROOT / "Dockerfile").read_text()
    useradd = re.search(r"useradd --uid (\d+)", text)
    user = re.search(r"^USER (\d+)$", text, re.M)
    assert useradd
    assert user
    assert useradd.group(1) == user.group(1)
    return int(user.group(1))


def test_workloads_run_as_the_images_user_on_a_read_only_root(
        rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    uid = _dockerfile_uid()
    for name, deployment in by_kind(docs, "Deployment").items():
        pod = deployment["spec"]["template"]["spec"]
        container = _container(deployment)
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] == uid, name
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True, name
        assert security["allowPrivilegeEscalation"] is False, name
        assert security["capabilities"]["drop"] == ["ALL"], name
        # Probes on the health endpoints, on the port aqsh binds.
        env = env_of(deployment)
        port = int(env["AQSH_BIND"].rsplit(":", 1)[1])
        assert container["ports"][0] == {"name": "http", "containerPort": port}
        assert container["readinessProbe"]["httpGet"] == {"path": "/health/ready", "port": "http"}
        assert container["livenessProbe"]["httpGet"] == {"path": "/health/live", "port": "http"}
        # The process commands the image's entry point (python -m aqsh) takes.
        assert container["args"] == [name.removeprefix("aqsh-")]
        # The password from a Secret, as a file at AQSH_REDIS_PASSWORD_FILE, never in env.
        assert "AQSH_REDIS_PASSWORD" not in env
        password = Path(env["AQSH_REDIS_PASSWORD_FILE"])
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        secret = volumes[mounts[str(password.parent)]]["secret"]
        assert secret["secretName"] == "aqsh-redis"
        assert secret["items"] == [{"key": "password", "path": password.name}]
        # tasks.yaml from the ConfigMap, mounted as a directory (a subPath mount would not
        # see edits, and aqsh reloads the file when it changes).
        config = Path(env["AQSH_TASKS_CONFIG"])
        tasks_volume = volumes[mounts[str(config.parent)]]
        assert tasks_volume["configMap"]["name"] in by_kind(docs, "ConfigMap")
        assert all("subPath" not in m for m in container["volumeMounts"])


def test_worker_outlasts_its_shutdown_and_writes_only_to_its_volumes(
        rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    worker = by_kind(docs, "Deployment")["aqsh-worker"]
    env = env_of(worker)
    pod = worker["spec"]["template"]["spec"]
    drain_s = parse_duration(env["AQSH_SHUTDOWN_TIMEOUT"]) + parse_duration(env["AQSH_KILL_GRACE"])
    assert pod["terminationGracePeriodSeconds"] > drain_s
    assert "replicas" not in worker["spec"]  # KEDA's HPA owns it
    container = _container(worker)
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    results = Path(env["AQSH_RESULTS_DIR"])
    work = next(Path(p) for p in mounts if results.is_relative_to(p) and p != "/")
    assert "emptyDir" in volumes[mounts[str(work)]]
    # A directory inside the volume: the worker refuses a group-writable work root.
    assert results != work
    assert "emptyDir" in volumes[mounts["/tmp"]]


def test_api_scales_on_cpu_and_both_have_disruption_budgets(
        rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    hpa = by_kind(docs, "HorizontalPodAutoscaler")["aqsh-api"]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": "aqsh-api"}
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert "replicas" not in by_kind(docs, "Deployment")["aqsh-api"]["spec"]  # the HPA's
    deployments = by_kind(docs, "Deployment")
    pdbs = by_kind(docs, "PodDisruptionBudget")
    for name in ("aqsh-api", "aqsh-worker"):
        labels = deployments[name]["spec"]["template"]["metadata"]["labels"]
        selector = pdbs[name]["spec"]["selector"]["matchLabels"]
        assert selector.items() <= labels.items(), name
    api_container = _container(deployments["aqsh-api"])
    assert api_container["resources"]["requests"]["cpu"]  # what CPU utilisation is relative to


def test_tasks_yaml_in_the_configmap_loads_against_the_images_scripts(
        rendered: tuple[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    """The ConfigMap's tasks.yaml is one aqsh accepts, naming scripts the image ships at
    /tasks (the Dockerfile copies examples/scripts there)."""
    _, docs = rendered
    text = by_kind(docs, "ConfigMap")["aqsh-tasks"]["data"]["tasks.yaml"]
    (tmp_path / "tasks.yaml").write_text(text)
    config = load_tasks(tmp_path / "tasks.yaml", ROOT / "examples" / "scripts")
    assert config.tasks
    assert "COPY examples/scripts /tasks" in (ROOT / "Dockerfile").read_text()


# ---------------------------------------------------------------------------- network
def _matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expr in selector.get("matchExpressions", []):
        value = labels.get(expr["key"])
        if expr["operator"] == "In" and value not in expr["values"]:
            return False
        if expr["operator"] == "NotIn" and value in expr["values"]:
            return False
    return True


def _pod_labels(docs: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    return {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"]
            for d in docs if d["kind"] in ("Deployment", "StatefulSet")}


def test_network_policies_open_only_the_api(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    overlay, docs = rendered
    policies = by_kind(docs, "NetworkPolicy")
    pods = _pod_labels(docs)
    covered = {pod for policy in policies.values() for pod, labels in pods.items()
               if _matches(policy["spec"]["podSelector"], labels)}
    assert covered == set(pods)  # every workload is under a policy
    api = policies["aqsh-api"]["spec"]
    assert api["ingress"] == [{"ports": [{"protocol": "TCP", "port": 8080}]}]  # from anywhere
    worker = policies["aqsh-worker"]["spec"]
    assert [rule["from"] for rule in worker["ingress"]] == [
        [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]]
    if overlay == "dev":
        redis = policies["redis"]["spec"]
        assert _matches(redis["podSelector"], pods["redis"])
        (rule,) = redis["ingress"]
        pod_peers = [p["podSelector"] for p in rule["from"] if "podSelector" in p]
        allowed = {name for name, labels in pods.items()
                   if any(_matches(peer, labels) for peer in pod_peers)}
        assert allowed == {"aqsh-api", "aqsh-worker"}
        # Only KEDA's namespace besides (it reads the queue lengths).
        assert [p for p in rule["from"] if "podSelector" not in p] == [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "keda"}}}]
    else:
        assert "StatefulSet" not in {d["kind"] for d in docs}  # no Redis in prod


# ---------------------------------------------------------------------------- custom resources
def _only_keys(obj: dict[str, Any], allowed: set[str], where: str) -> None:
    extra = set(obj) - allowed
    assert not extra, f"{where}: unknown fields {sorted(extra)}"


def _check_metadata(doc: dict[str, Any]) -> None:
    _only_keys(doc, {"apiVersion", "kind", "metadata", "spec"}, doc["kind"])
    assert isinstance(doc["metadata"]["name"], str)
    assert doc["metadata"].get("namespace") == "aqsh"


def check_scaled_object(doc: dict[str, Any], docs: list[dict[str, Any]]) -> None:
    """KEDA v2's ScaledObject: the fields used here, typed as KEDA's CRD types them (trigger
    metadata is a map of strings), the target and authentication existing."""
    _check_metadata(doc)
    assert doc["apiVersion"] == "keda.sh/v1alpha1"
    spec = doc["spec"]
    _only_keys(spec, {"scaleTargetRef", "pollingInterval", "cooldownPeriod", "minReplicaCount",
                      "maxReplicaCount", "advanced", "triggers", "fallback",
                      "idleReplicaCount"}, "ScaledObject.spec")
    assert spec["scaleTargetRef"]["name"] in by_kind(docs, "Deployment")
    assert isinstance(spec["minReplicaCount"], int)
    assert isinstance(spec["maxReplicaCount"], int)
    # Never zero: the workers fire the schedules and deliver the webhooks too.
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert isinstance(behavior["scaleDown"]["stabilizationWindowSeconds"], int)
    keys = queue_keys("default")
    lists = set()
    auths = by_kind(docs, "TriggerAuthentication")
    for trigger in spec["triggers"]:
        _only_keys(trigger, {"type", "name", "metadata", "authenticationRef",
                             "metricType", "useCachedMetrics"}, "trigger")
        assert trigger["type"] in ("redis", "redis-sentinel", "redis-cluster")
        metadata = trigger["metadata"]
        assert all(isinstance(v, str) for v in metadata.values()), metadata
        assert int(metadata["listLength"]) > 0
        if trigger["type"] == "redis":
            host, _, port = metadata["address"].rpartition(":")
            assert host
            assert port.isdigit()
        else:
            assert all(a.rpartition(":")[2].isdigit() for a in metadata["addresses"].split(","))
        lists.add(metadata["listName"])
        assert trigger["authenticationRef"]["name"] in auths
    # The queue depth as asynq stores it (aqsh/engine/keys.py): waiting and running tasks.
    assert lists == {keys.pending, keys.active}
    worker = by_kind(docs, "Deployment")["aqsh-worker"]
    concurrency = env_of(worker)["AQSH_WORKER_CONCURRENCY"]
    assert {t["metadata"]["listLength"] for t in spec["triggers"]} == {concurrency}


def check_trigger_authentication(doc: dict[str, Any], docs: list[dict[str, Any]]) -> None:
    _check_metadata(doc)
    assert doc["apiVersion"] == "keda.sh/v1alpha1"
    (ref,) = doc["spec"]["secretTargetRef"]
    assert ref == {"parameter": "password", "name": "aqsh-redis", "key": "password"}
    secrets = by_kind(docs, "Secret")
    if secrets:  # the dev overlay generates it; in prod it is created by hand (README)
        assert "password" in secrets["aqsh-redis"]["data"]


def check_service_monitor(doc: dict[str, Any], docs: list[dict[str, Any]]) -> None:
    _check_metadata(doc)
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    spec = doc["spec"]
    _only_keys(spec, {"selector", "endpoints", "jobLabel", "namespaceSelector"},
               "ServiceMonitor.spec")
    services = {name: s for name, s in by_kind(docs, "Service").items()
                if _matches(spec["selector"], s["metadata"].get("labels", {}))}
    # The job label is the Service's name: the alerts' up{job="aqsh-worker"} relies on it.
    assert set(services) == {"aqsh", "aqsh-worker"}
    (endpoint,) = spec["endpoints"]
    _only_keys(endpoint, {"port", "path", "interval", "scrapeTimeout"}, "endpoint")
    assert endpoint["path"] == "/metrics"
    assert parse_duration(endpoint["scrapeTimeout"]) < parse_duration(endpoint["interval"])
    for service in services.values():
        assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}


def check_prometheus_rule(doc: dict[str, Any], _docs: list[dict[str, Any]]) -> None:
    _check_metadata(doc)
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    (group,) = doc["spec"]["groups"]
    names = set()
    for rule in group["rules"]:
        _only_keys(rule, {"alert", "expr", "for", "labels", "annotations"}, "rule")
        assert re.fullmatch(r"Aqsh[A-Za-z]+", rule["alert"])
        names.add(rule["alert"])
        assert isinstance(rule["expr"], str)
        assert rule["expr"].strip()
        if "for" in rule:
            assert re.fullmatch(r"\d+[smh]", rule["for"])
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert {"summary", "description"} <= set(rule["annotations"])
    assert len(names) == len(group["rules"])


CHECKS = {"ScaledObject": check_scaled_object,
          "TriggerAuthentication": check_trigger_authentication,
          "ServiceMonitor": check_service_monitor, "PrometheusRule": check_prometheus_rule}


def test_custom_resources_are_well_formed(tmp_path: Path) -> None:
    for name, docs in _renders(tmp_path):
        seen = set()
        for doc in docs:
            if doc["kind"] in CHECKS:
                CHECKS[doc["kind"]](doc, docs)
                seen.add(doc["kind"])
        assert seen == CUSTOM_KINDS, name


def test_the_structural_check_catches_a_wrong_queue_key() -> None:
    docs = render_overlay("dev")
    scaled = by_kind(docs, "ScaledObject")["aqsh-worker"]
    scaled["spec"]["triggers"][0]["metadata"]["listName"] = "asynq:default:pending"
    with pytest.raises(AssertionError):
        check_scaled_object(scaled, docs)


def test_the_rules_file_is_the_one_in_the_base() -> None:
    deployed = (K8S / "base" / "prometheusrule.yaml").read_text()
    assert (ROOT / "deploy" / "prometheus" / "aqsh-rules.yaml").read_text() == deployed
    assert yaml.safe_load(deployed)["kind"] == "PrometheusRule"


def test_components_point_aqsh_and_keda_at_the_same_redis(tmp_path: Path) -> None:
    expected = {
        "redis-url": ("AQSH_REDIS_ADDR", "redis"),
        "redis-sentinel": ("AQSH_REDIS_SENTINEL_ADDRS", "redis-sentinel"),
        "redis-cluster": ("AQSH_REDIS_CLUSTER_ADDRS", "redis-cluster"),
    }
    for component, (var, trigger_type) in expected.items():
        docs = render_with_component(component, tmp_path)
        scaled = by_kind(docs, "ScaledObject")["aqsh-worker"]
        for deployment in by_kind(docs, "Deployment").values():
            env = env_of(deployment)
            redis_vars = {v for v in env if v.startswith("AQSH_REDIS_") and
                          v != "AQSH_REDIS_PASSWORD_FILE" and v != "AQSH_REDIS_SENTINEL_MASTER"}
            assert redis_vars == {var}, component  # one way to Redis, not two
            for trigger in scaled["spec"]["triggers"]:
                assert trigger["type"] == trigger_type
                address = trigger["metadata"].get("address") or trigger["metadata"]["addresses"]
                value = env[var]
                hosts = {a.rpartition(":")[0] for a in address.split(",")}
                assert all(h in value for h in hosts), (component, address, value)


# ---------------------------------------------------------------------------- skaffold
def test_skaffold_builds_the_manifests_image_and_deploys_the_dev_overlay() -> None:
    config = yaml.safe_load((ROOT / "skaffold.yaml").read_text())
    assert config["apiVersion"].startswith("skaffold/v4")
    (artifact,) = config["build"]["artifacts"]
    assert (ROOT / artifact["docker"]["dockerfile"]).is_file()
    assert config["manifests"]["kustomize"]["paths"] == ["k8s/overlays/dev"]
    # skaffold substitutes its built tag for images of the artifact's name.
    docs = render_overlay("dev")
    images = {_container(d)["image"] for d in by_kind(docs, "Deployment").values()}
    assert {image.partition(":")[0] for image in images} == {artifact["image"]}
    forward = config["portForward"][0]
    service = by_kind(docs, "Service")[forward["resourceName"]]
    assert forward["port"] in {p["port"] for p in service["spec"]["ports"]}
    assert forward["namespace"] == service["metadata"]["namespace"]


def test_the_docker_context_holds_what_the_dockerfile_copies() -> None:
    """.dockerignore lets through only what the Dockerfile copies (skaffold sends the context
    on every build): each COPY source must be one of its exceptions."""
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    rules = [line for line in lines if line and not line.startswith("#")]
    assert rules[0] == "*"
    allowed = {line[1:] for line in rules if line.startswith("!")}
    sources = []
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        parts = line.split()
        if parts[:1] == ["COPY"] and not parts[1].startswith("--from"):
            sources.extend(parts[1:-1])
    assert sources
    for source in sources:
        top = source.split("/", 1)[0]
        assert top in allowed, source
        assert (ROOT / source).exists(), source
