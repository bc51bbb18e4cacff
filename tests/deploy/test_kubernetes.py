"""deploy/kubernetes: rendered like `kubectl apply -k` would, validated against real
Kubernetes schemas, then the facts the schemas cannot see."""

from __future__ import annotations

import posixpath
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes_validate import utils as kv

from tests.deploy import kustomize
from tests.deploy.conftest import ROOT, SECRET_VARIABLES

KUBE = ROOT / "deploy" / "kubernetes"
TARGETS = {
    "base": KUBE / "base",
    "cpu": KUBE / "overlays/cpu",
    "keda": KUBE / "overlays/keda",
    "nats-auth": KUBE / "overlays/nats-auth",
}
# Custom resources: no schema in kubernetes-validate (its CLI only warns about them);
# test_keda_scaled_object checks this one by hand.
CRD_KINDS = {("keda.sh/v1alpha1", "ScaledObject")}
VERSIONS = ["1.29", kv.latest_version()]
GPU = "nvidia.com/gpu"

Resource = dict[str, Any]


def _key(resource: Resource) -> tuple[str, str, str]:
    return resource["apiVersion"], resource["kind"], resource["metadata"]["name"]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Resource]]:
    kubectl = kustomize.find_kubectl()
    if kubectl is None:
        return {name: kustomize.render(path) for name, path in TARGETS.items()}
    return {name: kustomize.kubectl_kustomize(kubectl, path) for name, path in TARGETS.items()}


def one(resources: list[Resource], kind: str) -> Resource:
    found = [r for r in resources if r["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def containers(resources: list[Resource]) -> dict[str, Resource]:
    pod = one(resources, "Deployment")["spec"]["template"]["spec"]
    return {c["name"]: c for c in pod["containers"]}


def config(resources: list[Resource]) -> dict[str, str]:
    return one(resources, "ConfigMap")["data"]


@pytest.mark.parametrize("target", TARGETS)
def test_kubectl_kustomize_agrees_with_the_python_renderer(target: str) -> None:
    kubectl = kustomize.find_kubectl()
    if kubectl is None:
        pytest.skip("kubectl absent: manifests rendered by tests/deploy/kustomize.py only")
    by_kubectl = {_key(r): r for r in kustomize.kubectl_kustomize(kubectl, TARGETS[target])}
    by_python = {_key(r): r for r in kustomize.render(TARGETS[target])}
    assert by_python == by_kubectl


def schema_problem(resource: Resource, version: str) -> str | None:
    """kubernetes-validate --strict on one resource: None when it passes."""
    try:
        kv.validate(resource, version, strict=True)
    except kv.SchemaNotFoundError:
        if (resource["apiVersion"], resource["kind"]) not in CRD_KINDS:
            return f"{_key(resource)}: no schema on {version}"
    except kv.ValidationError as err:
        path = ".".join(str(p) for p in err.path)
        return f"{_key(resource)} on {version}: {path}: {err.message}"
    return None


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("target", TARGETS)
def test_schemas_strict(rendered, target: str, version: str) -> None:
    problems = [schema_problem(resource, version) for resource in rendered[target]]
    assert not any(problems), "\n".join(p for p in problems if p)


@pytest.mark.parametrize("target", TARGETS)
def test_every_volume_mount_names_a_volume(rendered, target: str) -> None:
    pod = one(rendered[target], "Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"] for v in pod["volumes"]}
    for container in pod["containers"]:
        for mount in container.get("volumeMounts", []):
            assert mount["name"] in volumes, (container["name"], mount["name"])


def test_both_containers_and_their_probes(rendered) -> None:
    sidecar, host = containers(rendered["base"]).values()
    assert (sidecar["name"], host["name"]) == ("sidecar", "handler-host")
    assert sidecar["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert sidecar["readinessProbe"]["httpGet"]["path"] == "/readyz"
    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    assert sidecar["livenessProbe"]["httpGet"]["port"] in ("http", 8080)
    assert ports["http"] == int(config(rendered["base"])["KRT_HTTP_PORT"]) == 8080
    address = config(rendered["base"])["KRT_HANDLER_ADDRESS"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        command = host[probe]["exec"]["command"]
        assert command == ["python", "-m", "handler_host.probe", "--address", address], probe
    startup = host["startupProbe"]
    # init() may load a big model: at least 10 minutes before the kubelet gives up.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600


@pytest.mark.parametrize("target", TARGETS)
def test_one_socket_path_everywhere(rendered, target: str) -> None:
    pod = one(rendered[target], "Deployment")["spec"]["template"]["spec"]
    socket_volume = next(v for v in pod["volumes"] if v["name"] == "kre-socket")
    assert socket_volume["emptyDir"]["medium"] == "Memory"
    mounts = {
        c["name"]: m["mountPath"]
        for c in pod["containers"]
        for m in c["volumeMounts"]
        if m["name"] == "kre-socket"
    }
    assert set(mounts) == {"sidecar", "handler-host"}
    assert len(set(mounts.values())) == 1, mounts
    address = config(rendered[target])["KRT_HANDLER_ADDRESS"]
    assert address.startswith("unix://")
    assert posixpath.dirname(address.removeprefix("unix://")) == mounts["sidecar"]


def test_gpu_only_on_the_handler_host(rendered) -> None:
    for target in ("base", "keda"):
        by_name = containers(rendered[target])
        limit = by_name["handler-host"]["resources"]["limits"][GPU]
        assert isinstance(limit, int) and limit == 1, limit
        assert GPU not in str(by_name["sidecar"]["resources"])


def test_cpu_overlay_has_no_gpu(rendered) -> None:
    deployment = one(rendered["cpu"], "Deployment")
    assert GPU not in str(deployment), "the cpu overlay still mentions the GPU"
    assert containers(rendered["cpu"])["handler-host"]["resources"]["limits"]["memory"]


# Each container's credentials come from its own optional Secret, never from the ConfigMap.
SECRETS = {"sidecar": "kre-nats-auth", "handler-host": "kre-node-secrets"}


@pytest.mark.parametrize("target", TARGETS)
def test_config_map_has_every_readme_variable(rendered, target: str, env_table) -> None:
    data = config(rendered[target])
    missing = [name for name in env_table if name not in data and name not in SECRET_VARIABLES]
    assert not missing, f"ConfigMap lacks {missing}"
    assert all(isinstance(value, str) for value in data.values())
    name = one(rendered[target], "ConfigMap")["metadata"]["name"]
    for container in containers(rendered[target]).values():
        assert {"configMapRef": {"name": name}} in container["envFrom"], container["name"]


@pytest.mark.parametrize("target", TARGETS)
def test_credentials_reach_only_the_container_that_reads_them(rendered, target: str) -> None:
    data = config(rendered[target])
    leaked = [name for name in SECRET_VARIABLES if name in data]
    assert not leaked, f"credentials belong in a Secret, not the ConfigMap: {leaked}"
    assert all("@" not in url for url in data["KRT_NATS_SERVER"].split(",")), (
        "no credentials in KRT_NATS_SERVER: it is in the ConfigMap both containers get"
    )
    for name, container in containers(rendered[target]).items():
        refs = {s["secretRef"]["name"] for s in container["envFrom"] if "secretRef" in s}
        assert refs == {SECRETS[name]}, (name, refs)
        sources = [s for s in container["envFrom"] if "secretRef" in s]
        assert all(s["secretRef"]["optional"] is True for s in sources), name
        # A later envFrom source wins: the Secret must come after the ConfigMap.
        assert "secretRef" in container["envFrom"][-1], name
    for secret in (r for r in rendered[target] if r["kind"] == "Secret"):
        (reader,) = [c for c, s in SECRETS.items() if s == secret["metadata"]["name"]]
        keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
        assert all(SECRET_VARIABLES.get(key) == reader for key in keys), (reader, keys)


@pytest.mark.parametrize("target", TARGETS)
def test_nats_files_are_mounted_into_the_sidecar_only(rendered, target: str) -> None:
    pod = one(rendered[target], "Deployment")["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "nats-secrets")
    names = [source["secret"]["name"] for source in volume["projected"]["sources"]]
    assert names == ["kre-nats-tls", "kre-nats-creds"]
    assert all(source["secret"]["optional"] is True for source in volume["projected"]["sources"])
    assert volume["projected"]["defaultMode"] == 0o440
    mounts = {
        c["name"]: m
        for c in pod["containers"]
        for m in c["volumeMounts"]
        if m["name"] == "nats-secrets"
    }
    assert set(mounts) == {"sidecar"}
    assert mounts["sidecar"]["readOnly"] is True
    data = config(rendered[target])
    for name in (
        "KRT_NATS_TLS_CA_FILE",
        "KRT_NATS_TLS_CERT_FILE",
        "KRT_NATS_TLS_KEY_FILE",
        "KRT_NATS_CREDS_FILE",
        "KRT_NATS_NKEY_SEED_FILE",
    ):
        path = data[name]
        assert not path or posixpath.dirname(path) == mounts["sidecar"]["mountPath"], name


def test_the_nats_auth_overlay_requires_tls() -> None:
    from sidecar.errors import SettingsError
    from sidecar.settings import SidecarSettings

    data = config(kustomize.render(TARGETS["nats-auth"]))
    assert data["KRT_NATS_SERVER"].startswith("tls://")
    # The files are not mounted here: the settings reader says so, and nothing else.
    with pytest.raises(SettingsError) as info:
        SidecarSettings.from_env(data)
    assert {problem.split("=")[0] for problem in info.value.problems} == {
        "KRT_NATS_TLS_CA_FILE",
        "KRT_NATS_TLS_CERT_FILE",
        "KRT_NATS_TLS_KEY_FILE",
    }


def test_config_map_is_accepted_by_both_processes(rendered) -> None:
    # The processes' own settings readers: a typo in a value fails here, not in the pod.
    from handler_host.settings import HostSettings
    from sidecar.settings import SidecarSettings

    data = config(rendered["base"])
    assert SidecarSettings.from_env(data).handler_address == data["KRT_HANDLER_ADDRESS"]
    assert HostSettings.from_env(data).handler_address == data["KRT_HANDLER_ADDRESS"]


@pytest.mark.parametrize("target", TARGETS)
def test_security_context(rendered, target: str) -> None:
    pod = one(rendered[target], "Deployment")["spec"]["template"]["spec"]
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True
    assert isinstance(security["runAsUser"], int) and security["runAsUser"] > 0
    assert security["fsGroup"] == security["runAsUser"] == 10001  # the images' UID
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in pod["containers"]:
        ctx = container["securityContext"]
        assert ctx["readOnlyRootFilesystem"] is True, container["name"]
        assert ctx["allowPrivilegeEscalation"] is False, container["name"]
        assert ctx["capabilities"]["drop"] == ["ALL"], container["name"]
        assert "add" not in ctx["capabilities"], container["name"]
        # A read-only root needs somewhere to write temporary files.
        assert "/tmp" in {m["mountPath"] for m in container["volumeMounts"]}, container["name"]


def test_shutdown_fits_the_grace_period(rendered) -> None:
    pod = one(rendered["base"], "Deployment")["spec"]["template"]["spec"]
    grace = float(config(rendered["base"])["KRT_SHUTDOWN_GRACE"])
    pre_stop = containers(rendered["base"])["handler-host"]["lifecycle"]["preStop"]
    command = pre_stop["exec"]["command"]
    assert command[0] == "sleep"
    # The handler host's SIGTERM comes `sleep` seconds after the sidecar's; its own grace
    # then runs, and the whole must end before the kubelet's SIGKILL.
    assert float(command[1]) + grace < pod["terminationGracePeriodSeconds"]
    assert pod["terminationGracePeriodSeconds"] == 30


def test_resources_service_account_and_disruption_budget(rendered) -> None:
    resources = rendered["base"]
    for container in containers(resources).values():
        assert {"cpu", "memory"} <= set(container["resources"]["requests"]), container["name"]
        assert "memory" in container["resources"]["limits"], container["name"]
    account = one(resources, "ServiceAccount")
    pod = one(resources, "Deployment")["spec"]["template"]
    assert account["automountServiceAccountToken"] is False
    assert pod["spec"]["serviceAccountName"] == account["metadata"]["name"]
    assert pod["spec"]["automountServiceAccountToken"] is False
    labels = pod["metadata"]["labels"]
    selectors = [
        one(resources, "Deployment")["spec"]["selector"]["matchLabels"],
        one(resources, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
    ]
    for selector in selectors:
        assert selector.items() <= labels.items(), selector
    for resource in resources:
        assert resource["metadata"]["labels"]["app.kubernetes.io/name"] == "kre-node"


@pytest.mark.parametrize("target", TARGETS)
def test_only_prometheus_reaches_the_pod_and_only_its_metrics_ports(rendered, target: str) -> None:
    resources = rendered[target]
    policy = one(resources, "NetworkPolicy")["spec"]
    pod = one(resources, "Deployment")["spec"]["template"]
    assert policy["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert policy["policyTypes"] == ["Ingress"]
    [rule] = policy["ingress"]
    assert [peer["podSelector"]["matchLabels"] for peer in rule["from"]] == [
        {"app.kubernetes.io/name": "prometheus"}
    ]
    named = {
        port["name"]: port["containerPort"]
        for container in containers(resources).values()
        for port in container.get("ports", [])
    }
    allowed = {named[port["port"]] for port in rule["ports"]}
    metrics = {int(config(resources)["KRT_HTTP_PORT"]), int(config(resources)["KRT_METRICS_PORT"])}
    assert allowed == metrics


def test_images_are_swapped_by_name(rendered) -> None:
    images = {name: c["image"] for name, c in containers(rendered["base"]).items()}
    assert images["sidecar"].startswith("kre-sidecar:")
    assert images["handler-host"].startswith("kre-handler-host:")


def test_keda_scaled_object(rendered) -> None:
    resources = rendered["keda"]
    scaled = one(resources, "ScaledObject")
    deployment = one(resources, "Deployment")
    data = config(resources)
    assert "replicas" not in deployment["spec"], "KEDA's HPA owns the replica count"
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "nats-jetstream"
    meta = trigger["metadata"]
    required = {"natsServerMonitoringEndpoint", "account", "stream", "consumer", "lagThreshold"}
    assert required <= set(meta), required - set(meta)
    assert all(isinstance(value, str) for value in meta.values()), "KEDA metadata is strings"
    assert meta["stream"] == data["KRT_NATS_STREAM"]
    assert meta["consumer"] == (data["KRT_NATS_DURABLE"] or data["KRT_NODE_NAME"])
    assert int(meta["lagThreshold"]) > 0
    assert meta["natsServerMonitoringEndpoint"].endswith(":8222")


def test_every_manifest_file_is_used() -> None:
    # A YAML file no kustomization lists would silently never be applied.
    listed: set[Path] = set()
    for path in TARGETS.values():
        spec = yaml.safe_load((path / "kustomization.yaml").read_text())
        listed |= {(path / entry).resolve() for entry in spec.get("resources", [])}
        listed |= {(path / patch["path"]).resolve() for patch in spec.get("patches", [])}
        listed.add((path / "kustomization.yaml").resolve())
    on_disk = {p.resolve() for p in KUBE.rglob("*.yaml")}
    assert on_disk <= listed, sorted(str(p) for p in on_disk - listed)
