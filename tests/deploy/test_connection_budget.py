"""PostgreSQL connections at the deployment's worst moment, computed from the manifests
and the settings they set: every pool of every process full, each HPA at its maximum
plus the rolling update's surge pod, the migration job running. It must stay under
the budget the ConfigMap declares, and that under PostgreSQL's max_connections.

What one process opens at most (api/app.py's lifespan, worker.py's run_worker):

- API: the SQLAlchemy engine (pool + overflow), the read pool (ledger/reads.py) and
  one LISTEN connection (ledger/outcomes.py);
- worker: the SQLAlchemy engine (pool + overflow) and the payment ledger's pool, sized
  pool + overflow as well (ledger/payment_sql.py);
- migration: one connection (Alembic with a NullPool engine).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from config.settings import Settings

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
COMPOSE = REPO / "deploy" / "compose.yaml"
BUDGET_ANNOTATION = "payments.example.com/postgres-connection-budget"
# PostgreSQL's defaults: max_connections, and superuser_reserved_connections among them.
POSTGRES_MAX_CONNECTIONS = 100
POSTGRES_SUPERUSER_RESERVED = 3
# Temporal's server opens a pool per service and per store (auto-setup's SQL_MAX_CONNS).
TEMPORAL_SERVICES = ("frontend", "history", "matching", "worker")
TEMPORAL_STORES = ("temporal", "temporal_visibility")


def api_connections(settings: Settings) -> int:
    engine = settings.database_pool_size + settings.database_max_overflow
    return engine + settings.database_read_pool_size + 1


def worker_connections(settings: Settings) -> int:
    return 2 * (settings.database_pool_size + settings.database_max_overflow)


def _documents(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]


def _one(name: str, kind: str) -> dict[str, Any]:
    (found,) = [doc for doc in _documents(name) if doc["kind"] == kind]
    return found


def _settings(env: dict[str, str]) -> Settings:
    """Settings as a process with exactly this environment reads them."""
    fields = {
        name.removeprefix("PAYMENTS_").lower(): value
        for name, value in env.items()
        if name.startswith("PAYMENTS_DATABASE_")
    }
    return Settings.model_validate(fields)


def _pod_settings(deployment: dict[str, Any], configmap: dict[str, Any]) -> Settings:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = dict(configmap["data"])
    # A container's own env wins over its envFrom, as Kubernetes resolves them.
    env |= {item["name"]: item["value"] for item in container.get("env", [])}
    return _settings(env)


def _most_pods(deployment: dict[str, Any], hpa: dict[str, Any]) -> int:
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    surge = deployment["spec"]["strategy"]["rollingUpdate"]["maxSurge"]
    assert isinstance(surge, int), "a percentage surge needs counting here"
    return int(hpa["spec"]["maxReplicas"]) + surge


def kubernetes_worst_case() -> dict[str, int]:
    configmap = _one("configmap.yaml", "ConfigMap")
    api, worker = _one("api.yaml", "Deployment"), _one("worker.yaml", "Deployment")
    api_settings, worker_settings = _pod_settings(api, configmap), _pod_settings(worker, configmap)
    # One process per pod: Kubernetes scales by replicas.
    assert configmap["data"]["PAYMENTS_API_PROCESSES"] == "1"
    assert configmap["data"]["PAYMENTS_WORKER_PROCESSES"] == "1"
    migrate = _one("migrate-job.yaml", "Job")
    return {
        "api": _most_pods(api, _one("api.yaml", "HorizontalPodAutoscaler"))
        * api_connections(api_settings),
        "worker": _most_pods(worker, _one("worker.yaml", "HorizontalPodAutoscaler"))
        * worker_connections(worker_settings),
        "migrate": int(migrate["spec"].get("parallelism", 1)),
    }


def test_kubernetes_at_its_hpa_maximum_fits_postgresql_with_headroom() -> None:
    budget = int(_one("configmap.yaml", "ConfigMap")["metadata"]["annotations"][BUDGET_ANNOTATION])
    worst = kubernetes_worst_case()
    assert sum(worst.values()) <= budget, worst
    # The budget leaves room for people and tools besides the superusers' reserve.
    assert budget <= POSTGRES_MAX_CONNECTIONS - POSTGRES_SUPERUSER_RESERVED - 10


def test_the_configmaps_formula_counts_every_pool() -> None:
    """The comment operators size by says the same as the code counts."""
    text = (K8S / "configmap.yaml").read_text()
    worst = kubernetes_worst_case()
    api = _one("api.yaml", "Deployment")
    worker = _one("worker.yaml", "Deployment")
    configmap = _one("configmap.yaml", "ConfigMap")
    assert f"= {api_connections(_pod_settings(api, configmap))}\n" in text
    assert f"= {worker_connections(_pod_settings(worker, configmap))}\n" in text
    assert f"= {sum(worst.values())}," in text
    for pool in ("POOL_SIZE", "MAX_OVERFLOW", "READ_POOL_SIZE", "LISTEN"):
        assert pool in text


def test_compose_fits_its_postgresql_with_temporal_on_it() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    command = services["postgresql"]["command"]
    (max_connections,) = [
        int(arg.split("=", 1)[1]) for arg in command if arg.startswith("max_connections=")
    ]
    api_env = {k: str(v) for k, v in services["api"]["environment"].items()}
    worker_env = {k: str(v) for k, v in services["worker"]["environment"].items()}
    processes = int(api_env["PAYMENTS_API_PROCESSES"])
    workers = int(services["worker"]["deploy"]["replicas"])
    temporal = int(services["temporal"]["environment"]["SQL_MAX_CONNS"])
    worst = (
        processes * api_connections(_settings(api_env))
        + workers * worker_connections(_settings(worker_env))
        + 1  # migrate
        + temporal * len(TEMPORAL_SERVICES) * len(TEMPORAL_STORES)
    )
    assert worst <= max_connections - POSTGRES_SUPERUSER_RESERVED - 10, worst
