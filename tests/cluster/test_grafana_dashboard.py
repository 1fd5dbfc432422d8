"""cluster/grafana/ray-cai-dashboard.json against actors/metrics.py: the dashboard queries only series
ray-cai exports, shows every metric it declares (a new MetricSpec fails here until it has a panel),
and its template variables, panel ids, uid and title are sound. Pure JSON and regexes: no Ray, no
Grafana, no Prometheus; milliseconds.

What this can't check: that the PromQL parses, or how the panels look. Load the JSON into a
Grafana (docs/cluster.md) for that.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from actors.metrics import METRICS, TAGS, exported_names

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "cluster" / "grafana" / "ray-cai-dashboard.json"
METRIC_NAME = re.compile(r"\bray_cai_[a-z0-9_]+")
# a ray_cai_ series and its label matchers, if any: ray_cai_x{run=~"$run", stage=~"$stage"}
SELECTOR = re.compile(r"\b(ray_cai_[a-z0-9_]+)\s*(\{[^}]*\})?")
DATASOURCE_UIDS = {"${datasource}", "$datasource"}


def load() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(panels: list[dict]) -> Iterator[dict]:
    """Every panel, rows and the panels collapsed rows hold included, in order."""
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def graph_panels(dashboard: dict) -> list[dict]:
    return [p for p in all_panels(dashboard["panels"]) if p.get("type") != "row"]


def exprs(panel: dict) -> list[str]:
    return [t.get("expr", "") for t in panel.get("targets", [])]


def expr_problems(expr: str, known: set[str]) -> list[str]:
    """What is wrong with one panel query: no ray_cai_ series, or one ray-cai doesn't export."""
    names = set(METRIC_NAME.findall(expr))
    if not names:
        return [f"names no ray_cai_ metric: {expr!r}"]
    return [f"{name} is not exported by actors/metrics.py (exported_names())" for name in sorted(names - known)]


def panel_problems(dashboard: dict) -> list[str]:
    known = exported_names()
    problems = []
    for panel in graph_panels(dashboard):
        where = f"panel {panel.get('id')} {panel.get('title')!r}"
        if not panel.get("targets"):
            problems.append(f"{where}: no targets")
        for expr in exprs(panel):
            problems += [f"{where}: {p}" for p in expr_problems(expr, known)]
    return problems


def variables(dashboard: dict) -> dict[str, dict]:
    return {v["name"]: v for v in dashboard["templating"]["list"]}


def variable_query(variable: dict) -> str:
    query = variable.get("query")
    return query.get("query", "") if isinstance(query, dict) else (query or "")


def test_identity_and_schema():
    dashboard = load()
    assert dashboard["uid"] == "ray-cai" and dashboard["title"] == "ray-cai"
    assert 36 <= dashboard["schemaVersion"] <= 41, "a schema Grafana 10/11 loads without migrating"
    assert "id" not in dashboard or dashboard["id"] is None, "an exported id would clash on import"


def test_panel_ids_are_unique_and_panels_are_described():
    dashboard = load()
    panels = list(all_panels(dashboard["panels"]))
    ids = [p.get("id") for p in panels]
    assert None not in ids and len(ids) == len(set(ids)), f"panel ids not unique: {ids}"
    rows = [p for p in panels if p.get("type") == "row"]
    assert {r["title"] for r in rows} >= {"Sharded stages", "PPO", "Training (sft / rm / dpo)"}
    for panel in graph_panels(dashboard):
        assert panel.get("title") and panel.get("description"), f"panel {panel['id']} needs a title and a description"
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24 and pos["h"] > 0, f"panel {panel['id']} is off the grid"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), f"panel {panel['id']}: duplicate refIds {refs}"


def test_every_query_uses_only_exported_series():
    assert panel_problems(load()) == []


def test_every_metric_has_a_panel():
    """A new MetricSpec in actors/metrics.py fails this until the dashboard shows it."""
    shown = {name for panel in graph_panels(load()) for expr in exprs(panel) for name in METRIC_NAME.findall(expr)}
    missing = [spec.name for spec in METRICS if not set(spec.exported()) & shown]
    assert not missing, f"no panel shows {missing}: add one to cluster/grafana/ray-cai-dashboard.json"


def test_extra_tags_are_broken_out():
    """A metric with a tag beyond stage/run (cai_ppo_phase_seconds' phase) is shown by that tag."""
    all_exprs = [expr for panel in graph_panels(load()) for expr in exprs(panel)]
    for spec in METRICS:
        for tag in set(spec.tags) - set(TAGS):
            using = [e for e in all_exprs if set(spec.exported()) & set(METRIC_NAME.findall(e))]
            assert any(re.search(rf"\bby\s*\([^)]*\b{tag}\b", e) for e in using), f"{spec.name}: nothing groups by {tag}"


def test_counters_and_histograms_are_rated():
    """A counter or histogram series graphed raw only ever grows: queries take rate() or increase()."""
    kinds = {name: spec.kind for spec in METRICS for name in spec.exported()}
    for panel in graph_panels(load()):
        for expr in exprs(panel):
            cumulative = {n for n in METRIC_NAME.findall(expr) if kinds.get(n) in {"counter", "histogram"}}
            if cumulative:
                assert re.search(r"\b(rate|irate|increase)\s*\(", expr), f"panel {panel['id']}: {expr!r}"
            if any(n.endswith("_bucket") for n in cumulative):
                assert "histogram_quantile(" in expr and re.search(r"\bby\s*\([^)]*\ble\b", expr), expr


def test_every_query_follows_the_run_and_stage_variables():
    for panel in graph_panels(load()):
        for expr in exprs(panel):
            for name, matchers in SELECTOR.findall(expr):
                assert 'run=~"$run"' in matchers and 'stage=~"$stage"' in matchers, (
                    f"panel {panel['id']} {panel['title']!r}: {name} ignores the run/stage selection")


def test_every_panel_and_target_uses_the_datasource_variable():
    dashboard = load()
    for panel in graph_panels(dashboard):
        for source in [panel.get("datasource"), *(t.get("datasource") for t in panel["targets"])]:
            assert source and source.get("type") == "prometheus" and source.get("uid") in DATASOURCE_UIDS, (
                f"panel {panel['id']}: datasource {source}")


def test_template_variables():
    dashboard = load()
    found = variables(dashboard)
    datasource = found["datasource"]
    assert datasource["type"] == "datasource" and datasource["query"] == "prometheus"
    known = exported_names()
    for name in ("run", "stage"):
        variable = found[name]
        assert variable["type"] == "query" and variable["multi"] and variable["includeAll"], name
        assert variable["datasource"]["uid"] in DATASOURCE_UIDS, name
        query = variable_query(variable)
        assert expr_problems(query, known) == [], f"${name}: {expr_problems(query, known)}"
        assert name in query, f"${name} does not read the {name} label"
        definition = variable.get("definition")
        assert definition in (None, query), f"${name}: definition and query differ"
    # every variable a query or a variable refers to exists
    used = set(re.findall(r"\$\{?([A-Za-z_]\w*)", json.dumps(dashboard["panels"]) + json.dumps(found)))
    builtin = {name for name in used if name.startswith("__")}
    assert used - builtin <= set(found), f"undefined variables: {used - builtin - set(found)}"


def test_the_checks_catch_drift():
    """The checker itself: a renamed series inside a collapsed row, and a query naming no ray_cai_ series."""
    known = exported_names()
    drifted = {"panels": [{"type": "row", "id": 1, "collapsed": True, "panels": [
        {"type": "timeseries", "id": 2, "title": "t", "targets": [
            {"refId": "A", "expr": 'sum(rate(ray_cai_prompts_done_total{run=~"$run"}[1m]))'},
            {"refId": "B", "expr": "up"}]}]}]}
    problems = panel_problems(drifted)
    assert any("ray_cai_prompts_done_total is not exported" in p for p in problems), problems
    assert any("names no ray_cai_ metric" in p for p in problems), problems
    assert "ray_cai_prompts_completed_total" in known and "ray_cai_shard_seconds_bucket" in known


def test_metrics_module_imports_without_ray():
    """The dashboard test (and docs tooling) read actors.metrics without starting or importing Ray."""
    code = "import sys, actors.metrics; sys.exit('ray' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"importing actors.metrics imports ray\n{result.stderr}"
