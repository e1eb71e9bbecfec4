"""deploy/prometheus and deploy/grafana, checked without promtool or Grafana: their
structure, and that every metric an alert or a panel names is one we really export.

The exported names come from a running stack (started as ``make run`` starts it, on
free ports): the API's /metrics, the worker's two endpoints (Temporal SDK, business)
and the Temporal server's, scraped after a payment, a decline and a failed workflow
task. SDK metrics appear only once recorded, hence the traffic.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from temporalio.client import Client

from config.settings import Settings
from devstack.stack import Stack, StackConfig
from devstack.temporal_server import NAMESPACE
from domain.payments import TASK_QUEUE
from tests.helpers.eventually import wait_until

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS = REPO / "deploy" / "prometheus"
GRAFANA = REPO / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "payments.json"

# Prometheus makes these itself for every target.
SYNTHETIC_METRICS = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
SEVERITIES = {"page", "warning"}
_DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")


def _yaml(path: Path) -> dict[str, Any]:
    loaded = yaml.safe_load(path.read_text())
    assert isinstance(loaded, dict), path
    return loaded


def _dashboard() -> dict[str, Any]:
    loaded = json.loads(DASHBOARD.read_text())
    assert isinstance(loaded, dict)
    return loaded


# -- PromQL: the metric names an expression selects ------------------------------------

_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and",
             "or", "unless", "offset", "inf", "nan"}  # fmt: skip
_IDENTIFIER = re.compile(r"(?<![\w.$])[a-zA-Z_:][a-zA-Z0-9_:]*")


def metric_names(expr: str) -> set[str]:
    """Metric identifiers in a PromQL expression: not functions, labels or keywords."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range and subquery selectors
    text = _GROUPING.sub("", text)  # label lists of by/without/on/ignoring/group_*
    names = set()
    for match in _IDENTIFIER.finditer(text):
        token = match.group(0)
        if text[match.end() :].lstrip().startswith("("):
            continue  # a function or an aggregation operator
        if token.lower() in _KEYWORDS:
            continue
        names.add(token)
    return names


def test_metric_names_skip_functions_labels_and_keywords() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, route) (rate(api_seconds_bucket{route="/v1/x",'
        'status=~"5.."}[$__rate_interval]))) / on (job) group_left (x) sum(up offset 5m)'
        " > bool 1e3 and absent(other_total)"
    )
    assert metric_names(expr) == {"api_seconds_bucket", "up", "other_total"}


def _alert_rules() -> list[dict[str, Any]]:
    return [rule for group in _yaml(PROMETHEUS / "alerts.yml")["groups"] for rule in group["rules"]]


def _dashboard_exprs() -> list[str]:
    return [
        target["expr"]
        for panel in _dashboard()["panels"]
        if panel["type"] != "row"
        for target in panel["targets"]
    ]


def _referenced_metrics() -> dict[str, set[str]]:
    """Metric name -> where it is used."""
    used: dict[str, set[str]] = {}
    for rule in _alert_rules():
        for name in metric_names(rule["expr"]):
            used.setdefault(name, set()).add(f"alert {rule['alert']}")
    for expr in _dashboard_exprs():
        for name in metric_names(expr):
            used.setdefault(name, set()).add("dashboard")
    return used


# -- structure -------------------------------------------------------------------------


def test_prometheus_config_scrapes_api_worker_and_temporal_on_our_default_ports() -> None:
    config = _yaml(PROMETHEUS / "prometheus.yml")
    assert _DURATION.match(config["global"]["scrape_interval"])
    for rule_file in config["rule_files"]:
        assert (PROMETHEUS / Path(rule_file).name).is_file(), rule_file
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert len(jobs) == len(config["scrape_configs"]), "job names must be unique"

    def ports(job: dict[str, Any]) -> set[int]:
        found = {int(sd["port"]) for sd in job.get("dns_sd_configs", [])}
        for static in job.get("static_configs", []):
            found |= {int(target.rsplit(":", 1)[1]) for target in static["targets"]}
        assert found, f"{job['job_name']} has no targets"
        return found

    for job in jobs.values():
        assert job.get("metrics_path", "/metrics") == "/metrics"
        for sd in job.get("dns_sd_configs", []):
            assert sd["type"] in ("A", "AAAA", "SRV")
            assert sd["names"]
    defaults = Settings()
    assert ports(jobs["payments-api"]) == {8000}  # python -m api's default port
    assert ports(jobs["payments-worker-sdk"]) == {defaults.worker_sdk_metrics_port}
    assert ports(jobs["payments-worker"]) == {defaults.worker_metrics_port}
    assert "temporal" in jobs


def test_alert_rules_are_complete_and_cover_what_operators_need() -> None:
    rules = _alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(set(names)) == len(names)
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}
        assert rule["expr"].count("(") == rule["expr"].count(")"), rule["alert"]
        assert rule["expr"].count("{") == rule["expr"].count("}"), rule["alert"]
        assert _DURATION.match(rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
        assert rule["annotations"]["summary"]
        assert rule["annotations"]["description"]
        assert metric_names(rule["expr"]), f"{rule['alert']} names no metric"
    used = {name for rule in rules for name in metric_names(rule["expr"])}
    # Stuck payments, webhook backlog, provider error rate, non-determinism.
    assert {
        "payments_processing_oldest_age_seconds",
        "payments_webhook_oldest_undelivered_age_seconds",
        "payments_provider_errors_total",
        "temporal_workflow_task_execution_failed",
    } <= used
    nondeterminism = next(r for r in rules if r["alert"] == "WorkflowNonDeterminism")
    assert 'failure_reason="NonDeterminismError"' in nondeterminism["expr"]


def test_grafana_dashboard_panels_have_queries_on_the_provisioned_datasource() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"]
    assert dashboard["title"]
    datasources = _yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")
    uids = {source["uid"] for source in datasources["datasources"]}
    panels = dashboard["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    graphs = [panel for panel in panels if panel["type"] != "row"]
    assert len(graphs) >= 10
    for panel in graphs:
        assert panel["title"]
        assert panel["datasource"]["uid"] in uids, panel["title"]
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert ref_ids, panel["title"]
        assert len(set(ref_ids)) == len(ref_ids), panel["title"]
        for target in panel["targets"]:
            assert metric_names(target["expr"]), f"{panel['title']}: {target['expr']}"
            assert target["expr"].count("(") == target["expr"].count(")"), panel["title"]

    providers = _yaml(GRAFANA / "provisioning" / "dashboards" / "payments.yml")["providers"]
    assert providers[0]["type"] == "file"
    assert providers[0]["options"]["path"]


# -- every name is exported: scrape a running stack ------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{| )")
_TYPE = re.compile(r"^# TYPE ([a-zA-Z_:][a-zA-Z0-9_:]*) (\w+)")


def exported_names(exposition: str) -> set[str]:
    """Every series name a scrape can return, including histogram and counter suffixes."""
    names = set()
    for line in exposition.splitlines():
        if match := _TYPE.match(line):
            name, kind = match.groups()
            names.add(name)
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
            elif kind == "counter" and not name.endswith("_total"):
                names.add(f"{name}_total")
        elif match := _SAMPLE.match(line):
            names.add(match.group(1))
    return names


@pytest.fixture(scope="module")
async def scraped(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[dict[str, str]]:
    """Exposition text by endpoint, after traffic that records every kind of metric."""
    async with Stack(StackConfig.for_tests(tmp_path_factory.mktemp("observed"))) as stack:
        assert stack.demo_client is not None
        auth = {"Authorization": f"Bearer {stack.demo_client.api_key}"}
        async with httpx.AsyncClient(timeout=30) as http:
            for method in ("pm_card_visa", "pm_card_chargeDeclined"):
                body = {"amount": 500, "currency": "EUR", "payment_method": method}
                answer = await http.post(
                    f"{stack.api_url}/v1/payments",
                    json=body,
                    headers={**auth, "Idempotency-Key": str(uuid.uuid4())},
                )
                assert answer.status_code == 201, answer.text

            # A workflow type the worker does not know fails its workflow task: the
            # SDK then reports temporal_workflow_task_execution_failed.
            client = await Client.connect(stack.temporal_address, namespace=NAMESPACE)
            handle = await client.start_workflow(
                "NoSuchWorkflow", id=f"metrics-probe-{uuid.uuid4()}", task_queue=TASK_QUEUE
            )
            sdk_url = stack.worker_metrics_urls["sdk"]

            async def task_failure_reported() -> bool:
                text = (await http.get(sdk_url)).text
                return "temporal_workflow_task_execution_failed" in text

            await wait_until(task_failure_reported, within=30, interval=0.5)
            await handle.terminate("metrics probe done")

            urls = {
                "api": f"{stack.api_url}/metrics",
                **stack.worker_metrics_urls,
                "temporal": stack.temporal_metrics_url,
            }
            texts = {}
            for name, url in urls.items():
                response = await http.get(url)
                assert response.status_code == 200, name
                texts[name] = response.text
        yield texts


@pytest.mark.e2e
async def test_every_metric_in_alerts_and_dashboard_is_exported(scraped: dict[str, str]) -> None:
    exported = set().union(*(exported_names(text) for text in scraped.values()))
    used = _referenced_metrics()
    missing = {name: sorted(where) for name, where in used.items() if name not in exported}
    missing = {name: where for name, where in missing.items() if name not in SYNTHETIC_METRICS}
    assert not missing, f"named in deploy/ but exported by nothing we run: {missing}"


@pytest.mark.e2e
async def test_the_api_and_the_worker_time_their_garbage_collections(
    scraped: dict[str, str],
) -> None:
    """Both tuned their collector once started: the full collection before the freeze
    was timed, and so is every collection since."""
    for name in ("api", "business"):
        full = re.search(
            r'^payments_gc_pause_seconds_count\{generation="2"\} (\S+)$', scraped[name], re.M
        )
        assert full is not None, name
        assert float(full.group(1)) >= 1, name


@pytest.mark.e2e
async def test_each_endpoint_serves_its_own_metrics(scraped: dict[str, str]) -> None:
    api, sdk, business = (exported_names(scraped[key]) for key in ("api", "sdk", "business"))
    assert "payments_api_requests_total" in api
    # The API imports the activities (through the workflow module) but serves none
    # of the worker's metrics.
    assert not {name for name in api if name.startswith(("payments_outcomes", "temporal_"))}
    assert all(name.startswith("temporal_") for name in sdk if not name.startswith("#"))
    assert {"payments_outcomes_total", "payments_webhook_oldest_undelivered_age_seconds"} <= (
        business
    )
    assert not {name for name in business if name.startswith("payments_api_")}
    # The payment and the decline were counted by the worker that recorded them.
    assert re.search(
        r'^payments_outcomes_total\{failure_code="",outcome="succeeded"\} [1-9]',
        scraped["business"],
        re.M,
    )
    assert re.search(
        r'^payments_outcomes_total\{failure_code="card_declined",outcome="failed"\} [1-9]',
        scraped["business"],
        re.M,
    )
    assert 'failure_reason="' in scraped["sdk"]
