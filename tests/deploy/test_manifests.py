"""No Docker engine or cluster runs here, so the deployment files are checked by what
does run: the Kubernetes manifests against the API schemas (kubernetes-validate), the
compose file against the compose-spec schema (as shipped by check-jsonschema), and
both against our own code: every PAYMENTS_* name is a setting, probes hit real routes,
grace periods cover the worker's drain."""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from api.app import create_app
from config.codec import new_payload_key
from config.settings import Settings
from worker import GRACEFUL_SHUTDOWN

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "compose.yaml"
KUBERNETES_VERSION = "1.33"
APP_SERVICES = ("api", "worker", "migrate")


def _k8s_documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def _by_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in _k8s_documents() if doc["kind"] == kind]


def _deployment(name: str) -> dict[str, Any]:
    (found,) = [d for d in _by_kind("Deployment") if d["metadata"]["name"] == name]
    return found


def _compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def _setting_env_names() -> set[str]:
    names = {f"PAYMENTS_{name.upper()}" for name in Settings.model_fields}
    return names | {"DATABASE_URL"}


@pytest.mark.parametrize(
    ("source", "document"),
    _k8s_documents(),
    ids=[f"{s}:{d['kind']}/{d['metadata']['name']}" for s, d in _k8s_documents()],
)
def test_kubernetes_manifest_is_valid(source: str, document: dict[str, Any]) -> None:
    kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_kustomization_applies_every_manifest_but_the_secret_example() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk - {"secret.example.yaml"}


def test_api_and_worker_have_what_a_production_rollout_needs() -> None:
    for name in ("payments-api", "payments-worker"):
        deployment = _deployment(name)
        labels = deployment["spec"]["selector"]["matchLabels"]
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        assert "readinessProbe" in container
        assert "livenessProbe" in container
        refs = {next(iter(ref.values()))["name"] for ref in container["envFrom"]}
        assert refs == {"payments-config", "payments-secrets"}
        for kind in ("Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"):
            (match,) = [d for d in _by_kind(kind) if d["metadata"]["name"] == name]
            if kind == "HorizontalPodAutoscaler":
                assert match["spec"]["scaleTargetRef"]["name"] == name
                assert match["spec"]["minReplicas"] >= 2  # the PDB leaves one standing
            else:
                assert match["spec"]["selector"].get("matchLabels", match["spec"]["selector"]) == (
                    labels
                )


def test_worker_grace_period_covers_its_drain() -> None:
    spec = _deployment("payments-worker")["spec"]["template"]["spec"]
    drain = GRACEFUL_SHUTDOWN.total_seconds()
    assert spec["terminationGracePeriodSeconds"] >= drain + 5
    compose_grace = _compose()["services"]["worker"]["stop_grace_period"]
    assert int(compose_grace.removesuffix("s")) >= drain + 5


def test_api_probes_hit_a_real_route() -> None:
    routes = {getattr(route, "path", None) for route in create_app().routes}
    (container,) = _deployment("payments-api")["spec"]["template"]["spec"]["containers"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] in routes


def test_every_payments_env_name_in_k8s_and_compose_is_a_setting() -> None:
    used: set[str] = set()
    for doc in _by_kind("ConfigMap") + _by_kind("Secret"):
        used |= set(doc.get("data", {})) | set(doc.get("stringData", {}))
    for deployment in _by_kind("Deployment"):
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            used |= {env["name"] for env in container.get("env", [])}
    compose = _compose()
    for service in APP_SERVICES:
        used |= set(compose["services"][service]["environment"])
    ours = {name for name in used if name.startswith("PAYMENTS_") or name == "DATABASE_URL"}
    assert ours, "the manifests configure the app through settings"
    unknown = ours - _setting_env_names()
    assert not unknown, f"not settings: {sorted(unknown)}"
    # ... and the commented-out mTLS settings in the ConfigMap are real too.
    configmap_text = (K8S / "configmap.yaml").read_text()
    for name in ("PAYMENTS_TEMPORAL_TLS_CLIENT_CERT_PATH", "PAYMENTS_TEMPORAL_API_KEY"):
        assert name in configmap_text or name in (K8S / "secret.example.yaml").read_text()
        assert name in _setting_env_names()


def test_compose_file_matches_the_compose_spec() -> None:
    schema_text = (
        resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    ).read_text()
    schema = json.loads(schema_text)
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = sorted(validator.iter_errors(_compose()), key=lambda e: list(e.path))
    assert not errors, [f"{list(e.path)}: {e.message}" for e in errors]


def test_compose_runs_every_part_of_a_production_like_stack() -> None:
    services = _compose()["services"]
    expected = {"postgresql", "temporal", "temporal-ui", "api", "worker", "prometheus", "grafana"}
    assert expected <= set(services)
    assert services["temporal"]["environment"]["DB"].startswith("postgres")
    for name in APP_SERVICES:
        assert services[name]["build"]["dockerfile"] == "deploy/Dockerfile"


def test_compose_bind_mounts_exist() -> None:
    missing = set()
    for service in _compose()["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith(".") and not (DEPLOY / source).exists():
                missing.add(source.removeprefix("./"))
    assert not missing, f"missing: {sorted(missing)}"


def test_compose_ui_is_read_only_and_decodes_through_the_api_with_the_sign_in() -> None:
    services = _compose()["services"]
    ui = services["temporal-ui"]["environment"]
    api = services["api"]["environment"]
    assert ui["TEMPORAL_DISABLE_WRITE_ACTIONS"] == "true"
    assert ui["TEMPORAL_CODEC_INCLUDE_CREDENTIALS"] == "true"
    api_port = services["api"]["ports"][0].split(":")[0]
    ui_port = services["temporal-ui"]["ports"][0].split(":")[0]
    assert ui["TEMPORAL_CODEC_ENDPOINT"] == f"http://localhost:{api_port}/codec"
    assert ui["TEMPORAL_CODEC_DEFAULT_ERROR_LINK"] == ui["TEMPORAL_CODEC_ENDPOINT"] + "/login"
    assert api["PAYMENTS_CODEC_CORS_ORIGIN"] == f"http://localhost:{ui_port}"


def test_the_production_settings_of_compose_and_kubernetes_start_once_secrets_are_set() -> None:
    """Production refuses to start without payload keys (config/settings.py): both
    deployments must pass them, with the staff codec token, from their secrets."""
    filled = {
        "PAYMENTS_PAYLOAD_KEYS": f"k1:{new_payload_key()}",
        "PAYMENTS_CODEC_AUTH_TOKEN": "t" * 32,
        "PAYMENTS_PROVIDER_API_KEY": "sk_test_" + "x" * 24,
    }

    def resolved(value: object) -> str:
        # compose's ${NAME:?message}: the operator's value for NAME
        return re.sub(r"\$\{(\w+):\?[^}]*\}", lambda m: filled.get(m[1], "set"), str(value))

    compose_env = {k: resolved(v) for k, v in _compose()["services"]["api"]["environment"].items()}
    (configmap,) = _by_kind("ConfigMap")
    secret = next(
        doc for doc in yaml.safe_load_all((K8S / "secret.example.yaml").read_text()) if doc
    )
    k8s_env = {**configmap["data"], **secret["stringData"]}
    k8s_env = {k: filled.get(k, v) for k, v in k8s_env.items()}
    for env in (compose_env, k8s_env):
        assert env["PAYMENTS_ENVIRONMENT"] == "production"
        assert {"PAYMENTS_PAYLOAD_KEYS", "PAYMENTS_CODEC_AUTH_TOKEN"} <= env.keys()
        settings = Settings.model_validate(
            {k.removeprefix("PAYMENTS_").lower(): v for k, v in env.items() if k != "DATABASE_URL"}
        )
        assert settings.payload_keyring is not None
        assert settings.codec_cors_origin
