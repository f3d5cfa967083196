"""Prometheus' own tools read what virt-reclaim ships and writes: no VM, real consumers.

Debian's ``promtool`` checks the alert rules of ``examples/prometheus/`` and runs their
unit tests (every alert firing and staying quiet), lints the metrics file and parses each
expression of the Grafana dashboard; Debian's ``node_exporter`` serves the metrics file
the project's own writer makes, as it does on a host, and Debian's Prometheus scrapes it
and answers each query of the dashboard. The tools are unpacked into the test bed by
``scripts/setup.sh`` (see ``testbed.prometheus``).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from testbed.prometheus import node_exporter, prometheus, promtool, query, scrape
from unit.metrics.test_families import Built, write_and_read
from virt_reclaim.metrics.observations import Observations

ROOT = Path(__file__).resolve().parents[3]
RULES = ROOT / "examples" / "prometheus" / "virt-reclaim.rules.yml"
RULE_TESTS = ROOT / "examples" / "prometheus" / "virt-reclaim.rules.test.yml"
DASHBOARD = ROOT / "examples" / "grafana" / "virt-reclaim.json"
METRIC_NAME = re.compile(r"\bvirt_reclaim_[a-z0-9_]+")
Series = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """Real (fast) jobs in a journal, as in test_metrics: every family has samples."""
    return Built(tmp_path_factory.mktemp("prometheus"))


@pytest.fixture
def metrics_file(built: Built, tmp_path: Path) -> Path:
    """The metrics file, written by the project's writer alone in its folder."""
    path = tmp_path / "textfile" / "virt_reclaim.prom"
    path.parent.mkdir()
    write_and_read(built, path)
    return path


def series(text: str, prefix: str = "virt_reclaim_") -> Series:
    """Every sample of ``text`` whose name starts with ``prefix``, by name and labels."""
    found: Series = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith(prefix):
                found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def alerts() -> list[str]:
    rules = yaml.safe_load(RULES.read_text())
    return [rule["alert"] for group in rules["groups"] for rule in group["rules"]]


def dashboard_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows too."""
    for panel in panels:
        yield panel
        yield from dashboard_panels(panel.get("panels", []))


def dashboard_expressions() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard_panels(board["panels"])
            for target in panel.get("targets", [])]  # fmt: skip


def as_promql(expr: str) -> str:
    """A dashboard expression with Grafana's variables replaced, as Prometheus gets it."""
    expr = expr.replace("$__range", "7d").replace("$__rate_interval", "5m")
    return re.sub(r"\$\{?[A-Za-z_]\w*\}?", ".*", expr)


def test_promtool_accepts_the_alert_rules() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in result.stdout


def test_every_alert_fires_and_stays_quiet_in_promtool_unit_tests(tmp_path: Path) -> None:
    """The rules evaluated by promtool over each case's series, as Prometheus would."""
    result = promtool("test", "rules", str(RULE_TESTS), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
    # Each alert has a case where it fires and one where it must not.
    cases = [case for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
             for case in test["alert_rule_test"]]  # fmt: skip
    for alert in alerts():
        mine = [case for case in cases if case["alertname"] == alert]
        assert any(case["exp_alerts"] for case in mine), f"{alert} never fires in a test"
        assert any(not case["exp_alerts"] for case in mine), f"{alert} never stays quiet"


def test_promtool_lints_the_metrics_file_clean(metrics_file: Path) -> None:
    """Prometheus' naming rules: base units, counters end in _total, help on each family."""
    result = promtool("check", "metrics", cwd=metrics_file.parent, stdin=metrics_file)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not (result.stdout + result.stderr).strip()


def test_node_exporter_serves_every_series_of_the_metrics_file(
    built: Built, metrics_file: Path
) -> None:
    """node_exporter's textfile collector reads the file on each scrape and serves it as is."""
    written = series(metrics_file.read_text())
    assert len(written) > 30
    with node_exporter(metrics_file.parent) as url:
        text = scrape(url)
        served = series(text)
        assert served == written
        assert series(text, "node_textfile_scrape_error") == {
            ("node_textfile_scrape_error", frozenset()): 0.0
        }
        # A new write (atomic: a file renamed over the old one) is what the next scrape sees.
        seen = Observations(started_at=1_800_000_000.0)
        seen.window_opened("weekly")
        write_and_read(built, metrics_file, seen)
        again = series(scrape(url))
    assert again[("virt_reclaim_windows_opened_total", frozenset({("policy", "weekly")}))] == 1
    assert again[("virt_reclaim_daemon_start_time_seconds", frozenset())] == 1_800_000_000.0


def test_node_exporter_reports_a_file_it_cannot_parse(tmp_path: Path) -> None:
    """The witness can fail: a broken file is a scrape error, and none of it is served."""
    (tmp_path / "virt_reclaim.prom").write_text("virt_reclaim_jobs_total{domain=\n")
    with node_exporter(tmp_path) as url:
        text = scrape(url)
    assert series(text, "node_textfile_scrape_error") == {
        ("node_textfile_scrape_error", frozenset()): 1.0
    }
    assert not series(text)


def test_the_dashboard_names_only_metrics_that_are_written(built: Built, tmp_path: Path) -> None:
    path = tmp_path / "virt_reclaim.prom"
    samples = write_and_read(built, path)
    families = {f.name for f in text_string_to_metric_families(path.read_text())}
    written = {name for name, _labels in samples} | families
    expressions = dashboard_expressions()
    assert len(expressions) > 20
    used: set[str] = set()
    for expr in expressions:
        named = set(METRIC_NAME.findall(expr))
        assert named, expr
        assert named <= written, (expr, named - written)
        used |= named
    # The dashboard shows every family the daemon writes (a summary through _sum and _count).
    shown = {re.sub(r"_(sum|count)$", "", name) for name in used}
    assert {re.sub(r"_total$", "", name) for name in shown} >= families


def test_the_dashboard_is_importable_anywhere() -> None:
    """Unique panel ids, and every query through the data source variable (no fixed uid)."""
    board = json.loads(DASHBOARD.read_text())
    panels = list(dashboard_panels(board["panels"]))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    variables = {variable["name"]: variable for variable in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in panels:
        for target in [panel, *panel.get("targets", [])]:
            if "datasource" in target:
                assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}


def test_promtool_parses_every_dashboard_expression(tmp_path: Path) -> None:
    """Each expression, its Grafana variables replaced, as a recording rule promtool checks."""
    expressions = dashboard_expressions()
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"virt_reclaim_dashboard:expr_{n}", "expr": as_promql(expr)}
        for n, expr in enumerate(expressions)
    ]}]}  # fmt: skip
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(expressions)} rules found" in result.stdout


def test_every_dashboard_query_finds_the_daemons_series_in_a_real_prometheus(
    metrics_file: Path, tmp_path: Path
) -> None:
    """Prometheus scrapes node_exporter serving the file; each panel's query finds its data.

    A query whose metrics all have samples in the file must return series: a label matcher
    or a join that matches nothing would leave its panel empty on every host.
    """
    with_samples = {name for name, _labels in series(metrics_file.read_text())}
    with node_exporter(metrics_file.parent) as url, prometheus(url, tmp_path) as server:
        # Two scrapes at least, so that increase() over the range has samples to compare.
        deadline = time.monotonic() + 30
        while not query(server, "count_over_time(virt_reclaim_build_info[1h]) >= 2"):
            assert time.monotonic() < deadline, "Prometheus scraped node_exporter too few times"
            time.sleep(0.2)
        empty = [expr for expr in dashboard_expressions()
                 if set(METRIC_NAME.findall(expr)) <= with_samples
                 and not query(server, as_promql(expr))]  # fmt: skip
    assert not empty, empty
