"""deploy/: every metric the Grafana dashboard and the alert rules query is one a live aqsh
exports at /metrics.

A dashboard panel on a misspelt or renamed metric shows "No data" and an alert on one never
fires; neither fails anywhere else. The service is real: ``aqsh serve`` (API and worker in
one process) on a real Redis, after a task has run, so the event-driven families have samples
and the rest (webhooks, schedule fires, loop errors) must at least be declared (HELP/TYPE)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from aqsh.redis_process import RedisProcess, free_port
from tests.cli.conftest import ROOT, http_status, service_env
from tests.support import wait_until_sync

DASHBOARD = ROOT / "deploy" / "grafana" / "aqsh-dashboard.json"
RULES = ROOT / "deploy" / "prometheus" / "aqsh-rules.yaml"
#: Series the queries read that aqsh does not export, by design: Prometheus's own scrape
#: health, and kube-state-metrics' view of the worker Deployment (pods passing /health/ready).
EXTERNAL = {"up", "kube_deployment_status_replicas_ready"}
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool",
             "and", "or", "unless", "inf", "nan"}
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not functions, keywords, label names,
    durations or Grafana variables)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)        # strings: label values, regexes
    text = re.sub(r"\{[^}]*\}", "", text)                   # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)                  # ranges, subqueries
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "",
                  text)                                     # label lists
    text = re.sub(r"\$\w+", "", text)                       # Grafana variables
    names = set()
    for match in re.finditer(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = match.group(0)
        if text[match.end():].lstrip().startswith("(") or word.lower() in _KEYWORDS:
            continue
        names.add(word)
    return names


def test_metric_names_reads_promql_as_intended() -> None:
    expr = ('histogram_quantile(0.95, sum by (le, task) (rate(aqsh_script_duration_seconds_bucket'
            '{task=~"$task", x="a b"}[$__rate_interval]))) > 0 unless on (task) '
            'increase(aqsh_schedule_fires_total{outcome="stored"}[6h] offset 6h) or '
            'absent(up{job="aqsh-worker"} == 1)')
    assert metric_names(expr) == {"aqsh_script_duration_seconds_bucket",
                                  "aqsh_schedule_fires_total", "up"}


def _dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            exprs.extend(t["expr"] for t in panel.get("targets", []))
            walk(panel.get("panels", []))

    walk(dashboard["panels"])
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]["query"]
        label_values = re.fullmatch(r"label_values\((\w+),\s*\w+\)", query)
        assert label_values, query
        exprs.append(label_values.group(1))
    return exprs


def _rule_exprs() -> list[str]:
    rules = yaml.safe_load(RULES.read_text())
    return [rule["expr"] for group in rules["spec"]["groups"] for rule in group["rules"]]


def test_the_dashboard_and_rules_cover_what_the_issue_asks() -> None:
    """The panels and alerts the deployment promises, by the metrics they rest on."""
    dash = set().union(*map(metric_names, _dashboard_exprs()))
    assert {"asynq_queue_size", "asynq_queue_latency_seconds", "aqsh_tasks_submitted_total",
            "aqsh_tasks_finished_total", "aqsh_script_duration_seconds_bucket",
            "aqsh_sse_clients", "aqsh_loop_errors_total",
            "aqsh_webhook_deliveries_total"} <= dash
    assert any(e.startswith("histogram_quantile(0.99") for e in _dashboard_exprs())
    rules = yaml.safe_load(RULES.read_text())["spec"]["groups"][0]["rules"]
    by_alert = {r["alert"]: metric_names(r["expr"]) for r in rules}
    assert "asynq_queue_latency_seconds" in by_alert["AqshQueueLatencyHigh"]
    assert "asynq_tasks_enqueued_total" in by_alert["AqshArchivedGrowing"]
    assert "aqsh_schedule_fires_total" in by_alert["AqshScheduleStoppedFiring"]
    assert "up" in by_alert["AqshNoReadyWorkers"]
    assert "aqsh_loop_errors_total" in by_alert["AqshLoopErrors"]


# ---------------------------------------------------------------------------- live
def _get(url: str, body: dict[str, Any] | None = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method="POST" if data else "GET",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as resp:
        raw = resp.read()
    return raw.decode() if url.endswith("/metrics") else json.loads(raw)


@pytest.fixture(scope="module")
def metrics_text(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("observability")
    with RedisProcess() as redis_proc:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        with (root / "aqsh.log").open("w") as log:
            proc = subprocess.Popen([sys.executable, "-m", "aqsh", "serve"], cwd=ROOT,
                                    env=service_env(root, redis_proc.url, port),
                                    stdout=subprocess.DEVNULL, stderr=log)
            try:
                wait_until_sync(lambda: http_status(url + "/health/ready") == 200,
                                timeout_s=60, interval_s=0.1, message="aqsh serve ready")
                accepted = _get(url + "/tasks/echo", {"name": "metrics"})

                def finished() -> bool:
                    return bool(_get(f"{url}/tasks/{accepted['id']}")["state"] == "completed")

                wait_until_sync(finished, timeout_s=60, interval_s=0.1, message="task done")
                yield _get(url + "/metrics")
            finally:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def _exported(text: str) -> tuple[set[str], set[str]]:
    """Names /metrics declares (TYPE lines, with a histogram's sample names) and names it has
    samples of."""
    declared: set[str] = set()
    sampled: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            declared.add(name)
            if kind == "histogram":
                declared.update(name + suffix for suffix in _HISTOGRAM_SUFFIXES)
        elif line and not line.startswith("#"):
            sampled.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return declared, sampled


def test_every_queried_metric_is_exported(metrics_text: str) -> None:
    declared, sampled = _exported(metrics_text)
    queried = set().union(*map(metric_names, _dashboard_exprs() + _rule_exprs()))
    assert len(queried) > 15
    missing = sorted(queried - declared - EXTERNAL)
    assert missing == []
    # After one task, the families it touches carry samples, not only their declaration.
    for name in ("asynq_queue_size", "asynq_queue_latency_seconds", "asynq_tasks_enqueued_total",
                 "asynq_tasks_processed_total", "aqsh_tasks_submitted_total",
                 "aqsh_tasks_finished_total", "aqsh_script_duration_seconds_bucket",
                 "aqsh_sse_clients", "aqsh_http_requests_total"):
        assert name in sampled, name
    assert 'aqsh_tasks_finished_total{outcome="succeeded",task="echo"} 1.0' in metrics_text


def test_a_misspelt_metric_would_be_caught(metrics_text: str) -> None:
    declared, _ = _exported(metrics_text)
    assert "aqsh_script_duration_seconds_bucket" in declared
    assert "aqsh_tasks_submitted" not in declared  # a counter is exported as …_total
    assert metric_names("rate(aqsh_tasks_submitted[5m])") - declared == {"aqsh_tasks_submitted"}


def test_files_are_importable_as_they_are() -> None:
    """Grafana imports the JSON as is (a datasource variable, no hard-wired datasource uid);
    the rules file is the PrometheusRule k8s/base applies."""
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"]
    assert dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    ids = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            ids.append(panel["id"])
            if panel["type"] != "row":
                assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
                assert panel["targets"], panel["title"]
            walk(panel.get("panels", []))

    walk(dashboard["panels"])
    assert len(ids) == len(set(ids))
    assert Path(RULES).read_text() == (ROOT / "k8s" / "base" / "prometheusrule.yaml").read_text()
