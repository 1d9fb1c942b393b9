"""deploy/ checked offline: Docker cannot run here, so CI checks what it can without it.

The Kubernetes manifests against the Kubernetes API schemas (kubernetes-validate, strict), the compose file
against the Compose Specification's schema (vendored in tests/schemas/, see its README), and the operations
rules as tests so they cannot rot: probes, resources, a locked-down security context, pinned images, only
settings and commands the plugin really has.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonschema
import kubernetes_validate
import pytest
import yaml

from plugin.jobs.cli import _parser
from plugin.settings import SERVICE_SETTINGS
from tests.fhir_helpers import CLI, for_patient, free_port, stop, wait_until_ready

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
COMPOSE_SCHEMA = Path(__file__).parent / "schemas" / "compose-spec.json"
# The oldest Kubernetes minor still in common support, and the newest kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.31", kubernetes_validate.latest_version())
SETTINGS = {variable for variable, _ in SERVICE_SETTINGS.values()}
# Settings a deployment sets through command-line flags or never needs (each says why).
NOT_IN_CONFIG = {
    "BACKPAIN_HOST": "serve --host 0.0.0.0 in the image and manifests",
    "BACKPAIN_PORT": "the probes, the Service and the HEALTHCHECK assume 8000",
    "BACKPAIN_STORE": "the embedded store is single-node: Kubernetes runs against a FHIR server",
}
SECRET_WORDS = re.compile(r"TOKEN|SECRET|PASSWORD|PRIVATE|KEY\b")
# Settings whose value is the path of a secret file: the path is configuration, the file comes from a Secret.
SECRET_FILES = {"BACKPAIN_SMART_PRIVATE_KEY"}
# Values of $(VAR) references in Kubernetes args, to parse the commands as the container would see them.
EXPANSIONS = {"JOB_COMPLETION_INDEX": "0", "FHIR_BASE_URL": "https://fhir.hospital.example/fhir",
              "BACKPAIN_PUBLIC_URL": "https://backpain-screen.hospital.example"}


def manifests() -> list[tuple[str, dict]]:
    found = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        found += [(path.name, document) for document in yaml.safe_load_all(path.read_text()) if document]
    return found


def kustomization() -> dict:
    return yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def pod_specs() -> Iterator[tuple[str, dict]]:
    for name, manifest in manifests():
        kind, spec = manifest["kind"], manifest.get("spec", {})
        if kind == "CronJob":
            yield name, spec["jobTemplate"]["spec"]["template"]["spec"]
        elif kind in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
            yield name, spec["template"]["spec"]


def containers() -> Iterator[tuple[str, dict, dict]]:
    for name, pod in pod_specs():
        for container in pod.get("initContainers", []) + pod["containers"]:
            yield name, pod, container


def plugin_services() -> dict[str, dict]:
    return {name: service for name, service in compose()["services"].items()
            if service.get("image", "").startswith("backpain-screen:")}


# --- schemas -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_is_valid_kubernetes(version: str) -> None:
    for name, manifest in manifests():
        try:
            kubernetes_validate.validate(manifest, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{name} ({manifest['kind']}) is not valid for Kubernetes {version}: {error}")


def test_compose_file_follows_the_compose_specification() -> None:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    validator = jsonschema.Draft201909Validator(schema)  # the schema's $schema, spelt as jsonschema does not know
    errors = [f"{'/'.join(map(str, error.absolute_path))}: {error.message}"
              for error in validator.iter_errors(compose())]
    assert not errors, errors


def test_the_schema_catches_a_broken_compose_file() -> None:
    """The schema check above is not vacuous: a misspelt key and a wrong condition are refused."""
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    broken = compose()
    broken["services"]["plugin"]["helthcheck"] = broken["services"]["plugin"].pop("healthcheck")
    broken["services"]["publish"]["depends_on"]["plugin"]["condition"] = "healthy"
    errors = list(jsonschema.Draft201909Validator(schema).iter_errors(broken))
    assert len(errors) >= 2


def test_kustomization_lists_every_manifest_it_should() -> None:
    listed = kustomization()["resources"]
    on_disk = {path.name for path in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    assert sorted(listed) == sorted(on_disk)
    generated = {generator["name"] for generator in kustomization()["secretGenerator"]}
    referenced = {source["secretRef"]["name"] for _, _, container in containers()
                  for source in container.get("envFrom", []) if "secretRef" in source}
    assert referenced <= generated | {"backpain-screen-secrets"}
    assert {manifest["metadata"]["name"] for _, manifest in manifests() if manifest["kind"] == "Secret"} == generated


# --- pods: probes, resources, security -----------------------------------------------------------------------


def test_every_container_has_requests_and_limits() -> None:
    for name, _, container in containers():
        resources = container.get("resources", {})
        for bound in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(resources.get(bound, {})), f"{name}/{container['name']}: {bound}"


def test_every_container_is_locked_down() -> None:
    for name, pod, container in containers():
        context, pod_context = container.get("securityContext", {}), pod.get("securityContext", {})
        where = f"{name}/{container['name']}"
        assert context.get("runAsNonRoot", pod_context.get("runAsNonRoot")) is True, where
        assert pod_context.get("runAsUser", 0) != 0 and context.get("runAsUser", 1) != 0, where
        assert context.get("readOnlyRootFilesystem") is True, where
        assert context.get("allowPrivilegeEscalation") is False, where
        assert context.get("capabilities", {}).get("drop") == ["ALL"], where
        assert context.get("privileged", False) is False, where
        assert pod_context.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        assert pod.get("automountServiceAccountToken") is False, where
        mounts = {mount["mountPath"] for mount in container.get("volumeMounts", [])}
        assert "/tmp" in mounts, f"{where}: a read-only root needs a writable /tmp"


def test_serving_containers_have_liveness_and_readiness_probes() -> None:
    serving = [(name, container) for name, _, container in containers() if container.get("ports")]
    assert serving
    for name, container in serving:
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz", name
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz", name
        # /readyz gives the store 3 s (plugin.app.READY_WITHIN); the probe must wait longer than that.
        assert container["readinessProbe"].get("timeoutSeconds", 1) > 3, name
        assert {port["containerPort"] for port in container["ports"]} == {8000}, name


def test_batch_workloads_cannot_pile_up() -> None:
    by_kind = {manifest["kind"]: manifest for _, manifest in manifests()}
    cron = by_kind["CronJob"]["spec"]
    assert cron["concurrencyPolicy"] == "Forbid"
    assert cron["jobTemplate"]["spec"].get("activeDeadlineSeconds")
    job = next(m["spec"] for _, m in manifests() if m["kind"] == "Job" and m["spec"].get("completionMode"))
    assert job["completionMode"] == "Indexed"
    args = job["template"]["spec"]["containers"][0]["args"]
    partition = args[args.index("--partition") + 1]
    assert partition == f"$(JOB_COMPLETION_INDEX)/{job['completions']}", "--partition i/N needs N = completions"
    assert job["parallelism"] <= job["completions"]


def test_sync_keeps_its_watermark_on_a_volume() -> None:
    cron = next(manifest for _, manifest in manifests() if manifest["kind"] == "CronJob")
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    state = Path(args[args.index("--state") + 1])
    mounts = {mount["mountPath"]: mount["name"] for mount in pod["containers"][0]["volumeMounts"]}
    volume = next(v for v in pod["volumes"] if v["name"] == mounts[str(state.parent)])
    claim = volume["persistentVolumeClaim"]["claimName"]
    assert claim in {manifest["metadata"]["name"] for _, manifest in manifests()
                     if manifest["kind"] == "PersistentVolumeClaim"}


def test_the_autoscaler_and_the_disruption_budget_keep_two_replicas_serving() -> None:
    by_kind = {manifest["kind"]: manifest for _, manifest in manifests()}
    deployment, hpa = by_kind["Deployment"], by_kind["HorizontalPodAutoscaler"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert hpa["spec"]["minReplicas"] >= 2
    assert "replicas" not in deployment["spec"], "the autoscaler owns replicas; apply would reset them"
    assert by_kind["PodDisruptionBudget"]["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert by_kind["Service"]["spec"]["selector"] == selector
    assert by_kind["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"] == selector


def test_the_network_policy_covers_every_pod() -> None:
    policy = next(manifest for _, manifest in manifests() if manifest["kind"] == "NetworkPolicy")
    wanted = policy["spec"]["podSelector"]["matchLabels"]
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    for name, manifest in manifests():
        if manifest["kind"] in ("Deployment", "CronJob", "Job"):
            template = (manifest["spec"]["jobTemplate"]["spec"]["template"] if manifest["kind"] == "CronJob"
                        else manifest["spec"]["template"])
            assert wanted.items() <= template["metadata"]["labels"].items(), name


# --- images --------------------------------------------------------------------------------------------------


def dockerfile() -> str:
    return (DEPLOY / "Dockerfile").read_text()


def dockerfile_images() -> list[str]:
    defaults = dict(re.findall(r"^ARG (\w+)=(\S+)", dockerfile(), re.MULTILINE))
    images = re.findall(r"^FROM (\S+)", dockerfile(), re.MULTILINE)
    return [re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], image) for image in images]


def every_image() -> list[str]:
    images = dockerfile_images()
    images += [service["image"] for service in compose()["services"].values()]
    images += [container["image"] for _, _, container in containers()]
    images += [f"{image['newName']}:{image['newTag']}" for image in kustomization()["images"]]
    return images


def test_every_image_is_pinned() -> None:
    for image in every_image():
        name, _, tag = image.split("@")[0].rpartition(":")
        assert name and "/" not in tag, f"{image}: no tag"
        assert tag != "latest" and re.search(r"\d", tag), f"{image}: pin a version"


def test_the_dockerfile_is_multi_stage_non_root_and_checks_health() -> None:
    text = dockerfile()
    assert len(dockerfile_images()) >= 2
    final = text[text.rindex("\nFROM "):]
    user = re.findall(r"^USER (\S+)", final, re.MULTILINE)
    assert user and re.fullmatch(r"[1-9]\d*(:[1-9]\d*)?", user[-1]), "a numeric, non-root USER in the last stage"
    assert re.search(r"^HEALTHCHECK .*CMD", final, re.MULTILINE | re.DOTALL)
    assert "/healthz" in final
    assert "curl" not in final and "wget" not in final, "slim images have neither"
    for line in re.findall(r"^(?:ENV|ARG) .*", text, re.MULTILINE):
        assert not SECRET_WORDS.search(line), f"no secrets in the image: {line}"
    assert json.loads(re.search(r"^ENTRYPOINT (.*)$", final, re.MULTILINE).group(1)) == ["backpain-screen"]


def test_the_build_context_holds_what_the_dockerfile_copies() -> None:
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split("\n")
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "*" in ignore, "exclude everything by default: no .git, .venv or local state in the context"
    for sources in re.findall(r"^COPY (?!--from)(.*) \S+$", dockerfile(), re.MULTILINE):
        for source in sources.split():
            assert source in allowed and (ROOT / source).exists(), source


def test_the_image_pins_every_runtime_dependency_within_pyproject_ranges() -> None:
    """deploy/constraints.txt: each dependency pyproject.toml names is pinned, to a version its range allows."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pinned = dict(line.split("==") for line in (DEPLOY / "constraints.txt").read_text().splitlines()
                  if line and not line.startswith("#"))
    pinned = {canonicalize_name(name): version for name, version in pinned.items()}
    for spec in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        wanted = Requirement(spec)
        name = canonicalize_name(wanted.name)
        assert name in pinned, f"deploy/constraints.txt does not pin {name}"
        assert wanted.specifier.contains(pinned[name]), f"{name}=={pinned[name]} is outside {wanted.specifier}"


# --- compose -------------------------------------------------------------------------------------------------


def test_compose_starts_in_order_and_the_one_shot_steps_wait() -> None:
    services = compose()["services"]
    assert services["postgres"]["healthcheck"]["test"][1] == "pg_isready"
    assert services["hapi"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "/readyz" in " ".join(services["plugin"]["healthcheck"]["test"])
    assert services["publish"]["depends_on"]["plugin"]["condition"] == "service_healthy"
    assert services["subscribe"]["depends_on"]["publish"]["condition"] == "service_completed_successfully"
    for name in ("publish", "subscribe", "sync"):
        assert services[name]["restart"] == "no", name
        assert services[name]["healthcheck"] == {"disable": True}, f"{name} serves nothing for /healthz to find"


def test_compose_runs_hapi_on_postgres_with_rest_hooks() -> None:
    hapi = compose()["services"]["hapi"]
    environment = hapi["environment"]
    assert hapi["image"].startswith("hapiproject/hapi:")
    assert environment["SPRING_DATASOURCE_URL"].startswith("jdbc:postgresql://postgres:5432/")
    assert environment["SPRING_JPA_PROPERTIES_HIBERNATE_DIALECT"] == \
        "ca.uhn.fhir.jpa.model.dialect.HapiFhirPostgresDialect"
    assert environment["hapi.fhir.fhir_version"] == "R4"
    assert environment["hapi.fhir.subscription.resthook_enabled"] == "true"
    assert not any("PASSWORD" in key and not key.endswith("_FILE") for key in environment)
    assert compose()["services"]["postgres"]["environment"]["POSTGRES_PASSWORD_FILE"].startswith("/run/secrets/")


def test_compose_plugin_containers_are_locked_down_and_keep_secrets_out_of_the_file() -> None:
    for name, service in plugin_services().items():
        assert service["read_only"] is True, name
        assert service["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in service["security_opt"], name
        assert not service["user"].startswith("0"), name
        assert service["env_file"] == "plugin.env", name
        for key in service.get("environment", {}):
            assert not SECRET_WORDS.search(key), f"{name}: {key} belongs in plugin.env"
    for service in compose()["services"].values():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{port}: publish on loopback; a proxy with TLS goes in front"


def test_secret_files_are_ignored_by_git() -> None:
    ignored = (DEPLOY / ".gitignore").read_text().split()
    made_on_host = [compose()["services"]["plugin"]["env_file"],
                    *(secret["file"].removeprefix("./") for secret in compose()["secrets"].values()),
                    *(f"kubernetes/{env}" for generator in kustomization()["secretGenerator"]
                      for env in generator["envs"])]
    for path in made_on_host:
        assert any(f"/{path}".startswith(pattern.rstrip("/")) for pattern in ignored if pattern.startswith("/")), path


# --- settings and commands -----------------------------------------------------------------------------------


def env_file_keys(path: Path) -> set[str]:
    return {line.split("=", 1)[0] for line in path.read_text().splitlines() if re.match(r"^[A-Z_]+=", line)}


def configmap_and_secret_keys() -> tuple[set[str], set[str]]:
    config, secret = set(), set()
    for _, manifest in manifests():
        if manifest["kind"] == "ConfigMap":
            config |= set(manifest["data"])
        elif manifest["kind"] == "Secret":
            secret |= set(manifest.get("stringData", {})) | set(manifest.get("data", {}))
    return config, secret


def referenced_variables() -> dict[str, set[str]]:
    config, secret = configmap_and_secret_keys()
    found = {"kubernetes ConfigMap": config, "kubernetes Secret": secret,
             "kubernetes/secrets.env.example": env_file_keys(KUBERNETES / "secrets.env.example"),
             "plugin.env.example": env_file_keys(DEPLOY / "plugin.env.example"),
             "kubernetes env": {entry["name"] for _, _, c in containers() for entry in c.get("env", [])},
             "compose environment": {key for s in plugin_services().values() for key in s.get("environment", {})}}
    for where, names in found.items():
        found[where] = {name for name in names if name.startswith(("BACKPAIN_", "FHIR_"))}
    return found


def test_every_variable_deploy_sets_is_a_real_setting() -> None:
    for where, names in referenced_variables().items():
        assert names <= SETTINGS, f"{where} sets {sorted(names - SETTINGS)}, which plugin/settings.py does not know"


def test_config_and_secret_cover_every_setting_and_secrets_stay_secret() -> None:
    config, secret = configmap_and_secret_keys()
    assert not {name for name in config - SECRET_FILES if SECRET_WORDS.search(name)}, "secrets go in the Secret"
    assert not {name for name in secret if not SECRET_WORDS.search(name)}, "plain settings go in the ConfigMap"
    assert env_file_keys(KUBERNETES / "secrets.env.example") == secret
    missing = SETTINGS - config - secret - set(NOT_IN_CONFIG)
    assert not missing, f"new settings: put {sorted(missing)} in configmap.yaml or the Secret (or NOT_IN_CONFIG)"
    assert env_file_keys(DEPLOY / "plugin.env.example") >= {name for name in secret}


def test_secret_files_are_mounted_from_secrets_in_every_pod() -> None:
    config, _ = configmap_and_secret_keys()
    paths = {name: Path(value) for _, m in manifests() if m["kind"] == "ConfigMap"
             for name, value in m["data"].items() if name in SECRET_FILES}
    assert paths.keys() == SECRET_FILES & config
    for name, pod, container in containers():
        volumes = {volume["name"]: volume for volume in pod["volumes"]}
        mounts = {mount["mountPath"]: mount for mount in container["volumeMounts"]}
        for setting, path in paths.items():
            mount = mounts.get(str(path.parent))
            assert mount and mount.get("readOnly"), f"{name}: {setting} needs {path.parent} mounted read-only"
            secret = volumes[mount["name"]]["secret"]
            assert secret.get("optional") is True, f"{name}: pods must start without SMART configured"
            assert secret.get("defaultMode", 0o644) & 0o007 == 0, f"{name}: the key must not be world-readable"


def plugin_commands() -> Iterator[tuple[str, list[str]]]:
    """Every backpain-screen command line that deploy/ runs, as argv after the program name."""
    final = dockerfile()[dockerfile().rindex("\nFROM "):]
    yield "Dockerfile CMD", json.loads(re.search(r"^CMD (.*)$", final, re.MULTILINE).group(1))
    for name, service in plugin_services().items():  # the image's ENTRYPOINT is backpain-screen
        command = service.get("command")
        yield f"compose {name}", shlex.split(command) if isinstance(command, str) else command
    for name, _, container in containers():
        command = container.get("command", []) + container.get("args", [])
        assert command[0] == "backpain-screen", f"{name}: name the program, do not rely on the entrypoint"
        yield f"{name}/{container['name']}", [re.sub(r"\$\((\w+)\)", lambda m: EXPANSIONS[m.group(1)], word)
                                              for word in command[1:]]


def test_every_variable_an_argument_names_is_defined() -> None:
    """Kubernetes leaves an undefined $(VAR) as it is: the command would get the literal text."""
    config, secret = configmap_and_secret_keys()
    for name, _, container in containers():
        defined = config | secret | {entry["name"] for entry in container.get("env", [])}
        for word in container.get("args", []):
            for variable in re.findall(r"\$\((\w+)\)", word):
                assert variable in defined, f"{name}/{container['name']}: $({variable}) is defined nowhere"


def test_every_command_deploy_runs_is_accepted_by_the_cli() -> None:
    parser = _parser()
    commands = list(plugin_commands())
    assert {argv[0] for _, argv in commands} >= {"serve", "publish", "subscribe", "sync", "batch"}
    for where, argv in commands:
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"{where}: `backpain-screen {shlex.join(argv)}` is refused by the CLI (see stderr)")


def test_the_command_check_would_catch_a_wrong_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["sync", "--fhir-url", "https://fhir.example/fhir"])
    assert "--fhir-url" in capsys.readouterr().err


def test_the_readme_explains_every_file() -> None:
    readme = (DEPLOY / "README.md").read_text()
    ignored = [line.strip("/") for line in (DEPLOY / ".gitignore").read_text().split() if line.startswith("/")]
    files = [p.relative_to(DEPLOY).as_posix() for p in DEPLOY.rglob("*")
             if p.is_file() and p.name != "README.md"]
    files = [name for name in files if not any(name.startswith(pattern) for pattern in ignored)]
    for name in files:
        assert Path(name).name in readme, f"deploy/README.md does not mention {name}"


# --- the image's assumptions, checked on a real process ------------------------------------------------------


def healthcheck_command(test: list[str], port: int) -> list[str]:
    """A HEALTHCHECK's exec form, run here: this interpreter for `python`, the test's port for 8000."""
    assert test[0] == "python"
    return [sys.executable, *(word.replace(":8000/", f":{port}/") for word in test[1:])]


def image_healthcheck() -> list[str]:
    final = dockerfile()[dockerfile().rindex("\nFROM "):].replace("\\\n", " ")  # continuation lines joined
    return json.loads(re.search(r"^HEALTHCHECK .*?CMD (\[.*\])$", final, re.MULTILINE).group(1))


@pytest.fixture
def as_in_the_image(tmp_path: Path) -> dict:
    """The container's layout in miniature: the working and state directories must stay empty (the root
    filesystem is read-only); only TMPDIR may be written."""
    for name in ("work", "state", "home", "tmp"):
        (tmp_path / name).mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BACKPAIN_", "FHIR_"))}
    env.update({"HOME": str(tmp_path / "home"), "XDG_STATE_HOME": str(tmp_path / "state"),
                "TMPDIR": str(tmp_path / "tmp"), "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1"})
    return {"env": env, "cwd": tmp_path / "work", "root": tmp_path}


def test_the_service_writes_nothing_but_tmp_and_its_health_checks_work(
        fhir_base_url: str, patient: str, as_in_the_image: dict) -> None:
    port, env, root = free_port(), as_in_the_image["env"], as_in_the_image["root"]
    argv = json.loads(re.search(r"^CMD (.*)$", dockerfile(), re.MULTILINE).group(1))
    argv = [*CLI, *argv, "--port", str(port), "--fhir-base-url", fhir_base_url]
    log = root / "tmp" / "serve.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(argv, cwd=as_in_the_image["cwd"], env={**env, "BACKPAIN_PORT": str(port)},
                                   stdout=sink, stderr=subprocess.STDOUT)
    try:
        wait_until_ready(f"http://127.0.0.1:{port}/readyz", process, 60, log.read_text)
        posted = httpx.post(f"http://127.0.0.1:{port}/QuestionnaireResponse", timeout=30,
                            content=for_patient("qr-refer-asas.json", patient),
                            headers={"Content-Type": "application/fhir+json"})
        assert posted.status_code == 201, posted.text
        assert httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).status_code == 200
        checks = {"image": image_healthcheck(), "compose": compose()["services"]["plugin"]["healthcheck"]["test"][1:]}
        for name, test in checks.items():
            ran = subprocess.run(healthcheck_command(test, port), env={**env, "BACKPAIN_PORT": str(port)},
                                 capture_output=True, timeout=10)
            assert ran.returncode == 0, f"{name} health check: {ran.stderr.decode()}"
    finally:
        stop(process)
    dead = subprocess.run(healthcheck_command(image_healthcheck(), port), env={**env, "BACKPAIN_PORT": str(port)},
                          capture_output=True, timeout=10)
    assert dead.returncode != 0, "the health check must fail when nothing answers"
    for name in ("work", "state", "home"):
        assert not any((root / name).rglob("*")), f"serve wrote to {name}: the read-only root filesystem would refuse"


def test_sync_writes_only_its_state_directory(fhir_base_url: str, as_in_the_image: dict) -> None:
    """The CronJob mounts one volume for the watermark; everything sync writes must be under it."""
    root = as_in_the_image["root"]
    cron = next(manifest for _, manifest in manifests() if manifest["kind"] == "CronJob")
    args = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"]
    state = root / "volume" / Path(args[args.index("--state") + 1]).name
    state.parent.mkdir()
    argv = [word.replace("$(FHIR_BASE_URL)", fhir_base_url) for word in args]
    argv[argv.index("--state") + 1] = str(state)
    ran = subprocess.run([*CLI, *argv], cwd=as_in_the_image["cwd"], env=as_in_the_image["env"],
                         capture_output=True, timeout=120)
    assert ran.returncode == 0, ran.stderr.decode()
    assert state.exists()
    for name in ("work", "state", "home"):
        assert not any((root / name).rglob("*")), f"sync wrote to {name}, outside its volume"
