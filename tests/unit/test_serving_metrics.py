"""docs/grafana/raymoe-serving.json and docs/serving-metrics.md query only metrics serve/metrics.py records."""

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _recorded() -> set[str]:
    source = (ROOT / "platform" / "raymoe" / "serve" / "metrics.py").read_text()
    return set(re.findall(r'(?:Counter|Gauge|Histogram)\(\s*"(raymoe_\w+)"', source))


def _queried(text: str) -> set[str]:
    return {re.sub(r"_(bucket|sum|count)$", "", m) for m in re.findall(r"ray_(raymoe_\w+)", text)}


def test_the_dashboard_and_the_docs_query_only_recorded_metrics_and_the_dashboard_plots_them_all():
    recorded = _recorded()
    assert len(recorded) == 10
    dash = json.loads((ROOT / "docs" / "grafana" / "raymoe-serving.json").read_text())
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
    assert _queried(exprs) <= recorded
    assert recorded - _queried(exprs) == {"raymoe_routed_tokens_per_second"}  # the autoscaler's view; the panel uses rate()
    assert _queried((ROOT / "docs" / "serving-metrics.md").read_text()) == recorded
