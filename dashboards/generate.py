"""Grafana dashboards as code (grafana-foundation-sdk, pinned in pyproject.toml).

    .venv/bin/python dashboards/generate.py          # writes the JSON and the ConfigMap
    .venv/bin/python dashboards/generate.py --check  # exit 1 if they are stale

Writes ``dashboards/gradwatch-overview.json``, ``dashboards/gradwatch-job.json`` and
``deploy/kubernetes/grafana-dashboards.yaml`` (the same JSON in a ConfigMap labelled
for the Grafana sidecar). Every panel query is tested against a real Prometheus in
``tests/integration/test_dashboards.py``: rename a metric and that test fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import (
    bargauge,
    dashboard,
    prometheus,
    stat,
    statetimeline,
    table,
    timeseries,
)
from grafana_foundation_sdk.builders.common import (
    ReduceDataOptions,
    ScaleDistributionConfig,
    VizLegendOptions,
    VizTooltipOptions,
)
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import (
    BarGaugeDisplayMode,
    BigValueGraphMode,
    LegendDisplayMode,
    LegendPlacement,
    ScaleDistribution,
    SortOrder,
    TooltipDisplayMode,
    VisibilityMode,
    VizOrientation,
)
from grafana_foundation_sdk.models.dashboard import (
    DataSourceRef,
    ValueMap,
    ValueMappingResult,
    VariableRefresh,
    VariableSort,
)

ROOT = Path(__file__).resolve().parents[1]
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
JOB = 'training_job="$training_job"'
RATE = "$__rate_interval"


def query(expr: str, legend: str = "", instant: bool = False, ref: str = "A"
          ) -> prometheus.Dataquery:
    q = prometheus.Dataquery().expr(expr).datasource(DATASOURCE).ref_id(ref)
    if legend:
        q = q.legend_format(legend)
    if instant:
        q = q.instant().format("table")
    return q


def series(title: str, description: str, unit: str, *targets: prometheus.Dataquery,
           log: bool = False, width: int = 12) -> timeseries.Panel:
    panel = (timeseries.Panel().title(title).description(description).unit(unit)
             .datasource(DATASOURCE).height(8).span(width).fill_opacity(10)
             .legend(VizLegendOptions().show_legend(True).display_mode(LegendDisplayMode.LIST)
                     .placement(LegendPlacement.BOTTOM).calcs([]))
             .tooltip(VizTooltipOptions().mode(TooltipDisplayMode.MULTI).sort(SortOrder.DESCENDING)))
    if log:
        panel = panel.scale_distribution(
            ScaleDistributionConfig().type(ScaleDistribution.LOG).log(10))
    for ref, target in zip("ABCDEFGH", targets, strict=False):
        panel = panel.with_target(target.ref_id(ref))
    return panel


def last_value() -> ReduceDataOptions:
    return ReduceDataOptions().calcs(["lastNotNull"]).values(False)


def single(title: str, description: str, unit: str, expr: str) -> stat.Panel:
    return (stat.Panel().title(title).description(description).unit(unit)
            .datasource(DATASOURCE).height(4).span(6).with_target(query(expr))
            .reduce_options(last_value()).graph_mode(BigValueGraphMode.AREA))


def datasource_variable() -> dashboard.DatasourceVariable:
    return dashboard.DatasourceVariable("datasource").label("Data source").type("prometheus")


def overview() -> dashboard.Dashboard:
    return (
        dashboard.Dashboard("gradwatch: overview").uid("gradwatch-overview")
        .description("Every training job watched by gradwatch: health, gradient norms, "
                     "variables without gradient, NaN/Inf.")
        .tags(["gradwatch"]).refresh("30s").time("now-1h", "now")
        .with_variable(datasource_variable())
        .with_row(dashboard.Row("Health"))
        .with_panel(single("Jobs reporting", "Training jobs with at least one task known to the "
                           "collectors.", "short",
                           "count(count by (training_job) (gradwatch_steps_total))"))
        .with_panel(single("Steps per second", "Training steps reported per second, all jobs "
                           "and tasks.", "short", f"sum(rate(gradwatch_steps_total[{RATE}]))"))
        .with_panel(single("Variables without gradient", "Sum over jobs, tasks and replicas of "
                           "variables that got no gradient at their latest step.", "short",
                           "sum(gradwatch_variables_without_gradient)"))
        .with_panel(single("Firing gradient alerts", "Alerts the collectors fire now "
                           "(GradientMissing, GradientNonFinite, ...).", "short",
                           "sum(gradwatch_alerts_active)"))
        .with_panel(series("Steps per second by job", "Training throughput as reported by the "
                           "agents; a flat line at 0 with a recent report means a stalled step.",
                           "short", query(f"sum by (training_job) (rate(gradwatch_steps_total"
                                          f"[{RATE}]))", "{{training_job}}")))
        .with_panel(series("Last report age", "Seconds since each running task last reported; "
                           "WorkerSilent fires past its threshold. Finished tasks leave the "
                           "graph.", "s", query("time() - gradwatch_last_report_timestamp_seconds",
                                                "{{training_job}} {{task_type}}/{{task_index}}")))
        .with_row(dashboard.Row("Gradients"))
        .with_panel(series("Global gradient norm by task and replica", "L2 norm of all "
                           "gradients of the step, per task and replica (log scale).", "short",
                           query("gradwatch_global_gradient_norm",
                                 "{{training_job}} {{task_type}}/{{task_index}} r{{replica}}"),
                           log=True))
        .with_panel(series("Variables without gradient", "Per task and replica, at the latest "
                           "step. See the job dashboard for which ones and why.", "short",
                           query("max by (training_job) "
                                 "(gradwatch_variables_without_gradient)",
                                 "{{training_job}}")))
        .with_panel(series("Non-finite steps per second", "Steps with NaN or Inf in any "
                           "gradient (loss-scale skipped steps excluded).", "short",
                           query(f"sum by (training_job) (rate(gradwatch_nonfinite_steps_total"
                                 f"[{RATE}]))", "{{training_job}}")))
        .with_panel(series("NaN and Inf gradient values per second", "Elements counted by the "
                           "agents, all variables of a job.", "short",
                           query(f"sum by (training_job) (rate(gradwatch_gradient_nan_values_total"
                                 f"[{RATE}]))", "{{training_job}} NaN"),
                           query(f"sum by (training_job) (rate(gradwatch_gradient_inf_values_total"
                                 f"[{RATE}]))", "{{training_job}} Inf")))
        .with_panel(series("Firing alerts", "By alert name and severity.", "short",
                           query("gradwatch_alerts_active", "{{alertname}} ({{severity}})"),
                           width=24))
    )


def job_detail() -> dashboard.Dashboard:
    job_variable = (
        dashboard.QueryVariable("training_job").label("Training job").datasource(DATASOURCE)
        .query("label_values(gradwatch_steps_total, training_job)")
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).sort(VariableSort.ALPHABETICAL_ASC))
    variable_variable = (
        dashboard.QueryVariable("variable").label("Variable").datasource(DATASOURCE)
        .query(f"label_values(gradwatch_gradient_norm{{{JOB}}}, variable)")
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).sort(VariableSort.ALPHABETICAL_ASC)
        .multi(True).include_all(True).all_value(".*"))
    selected = f'{JOB},variable=~"$variable"'
    presence = ValueMap({"0": ValueMappingResult(text="missing", color="red", index=0),
                         "1": ValueMappingResult(text="present", color="green", index=1)})
    return (
        dashboard.Dashboard("gradwatch: job").uid("gradwatch-job")
        .description("One training job: per-variable gradient norms and presence, why "
                     "gradients are missing, replica and worker divergence.")
        .tags(["gradwatch"]).refresh("30s").time("now-1h", "now")
        .with_variable(datasource_variable()).with_variable(job_variable)
        .with_variable(variable_variable)
        .with_row(dashboard.Row("Job"))
        .with_panel(single("Steps per second", "All tasks of the job.", "short",
                           f"sum(rate(gradwatch_steps_total{{{JOB}}}[{RATE}]))"))
        .with_panel(single("Latest step", "Highest step any task reported.", "none",
                           f"max(gradwatch_last_step{{{JOB}}})"))
        .with_panel(single("Variables without gradient", "Worst task and replica at the "
                           "latest step.", "short",
                           f"max(gradwatch_variables_without_gradient{{{JOB}}})"))
        .with_panel(single("Dropped steps", "Steps the agents recorded but could not deliver "
                           "(buffers full while the collector was away).", "short",
                           f"sum(gradwatch_dropped_steps_total{{{JOB}}})"))
        .with_panel(
            table.Panel().title("Why gradients are missing")
            .description("The agent's diagnosis for each variable without gradient: the cause, "
                         "and the op and source line that break the path to the loss.")
            .datasource(DATASOURCE).height(8).span(24).show_header(True)
            .with_target(query(f"gradwatch_gradient_missing_cause_info{{{JOB}}}", instant=True)))
        .with_row(dashboard.Row("Variables"))
        .with_panel(
            statetimeline.Panel().title("Gradient present").description(
                "Per variable: green when every task and replica had a gradient at the latest "
                "step, red when some did not.")
            .datasource(DATASOURCE).height(10).span(24).mappings([presence])
            .show_value(VisibilityMode.NEVER).merge_values(True)
            .with_target(query(f"gradwatch_gradient_present{{{selected}}}", "{{variable}}")))
        .with_panel(series("Gradient norm per variable", "Max over tasks and replicas "
                           "(log scale).", "short",
                           query(f"gradwatch_gradient_norm{{{selected}}}", "{{variable}}"),
                           log=True))
        .with_panel(
            bargauge.Panel().title("Top 10 variables by gradient norm")
            .description("Largest gradient norms at the latest step.")
            .datasource(DATASOURCE).height(8).span(12).orientation(VizOrientation.HORIZONTAL)
            .display_mode(BarGaugeDisplayMode.GRADIENT).reduce_options(last_value())
            .with_target(query(f"topk(10, gradwatch_gradient_norm{{{JOB}}})", "{{variable}}",
                               instant=True)))
        .with_panel(series("Steps without gradient per second", "Task-replica steps in which "
                           "the variable had no gradient.", "short",
                           query(f"rate(gradwatch_gradient_missing_steps_total{{{selected}}}"
                                 f"[{RATE}])", "{{variable}}")))
        .with_panel(series("NaN and Inf values per second", "Per variable.", "short",
                           query(f"rate(gradwatch_gradient_nan_values_total{{{selected}}}"
                                 f"[{RATE}])", "{{variable}} NaN"),
                           query(f"rate(gradwatch_gradient_inf_values_total{{{selected}}}"
                                 f"[{RATE}])", "{{variable}} Inf")))
        .with_row(dashboard.Row("Replicas and workers"))
        .with_panel(series("Global gradient norm by task and replica", "Replicas of one step "
                           "should agree; one far off is what ReplicaDivergence flags.", "short",
                           query(f"gradwatch_global_gradient_norm{{{JOB}}}",
                                 "{{task_type}}/{{task_index}} r{{replica}}"), log=True))
        .with_panel(series("Divergence: max / min global norm", "Across the job's tasks and "
                           "replicas; ReplicaDivergence fires above its norm_ratio (10 by "
                           "default).", "short",
                           query(f"max(gradwatch_global_gradient_norm{{{JOB}}}) / "
                                 f"min(gradwatch_global_gradient_norm{{{JOB}}} > 0)", "ratio")))
        .with_panel(series("Last report age per task", "Seconds since each running task last "
                           "reported.", "s",
                           query(f"time() - gradwatch_last_report_timestamp_seconds{{{JOB}}}",
                                 "{{task_type}}/{{task_index}}")))
        .with_panel(series("Skipped and non-finite steps per second", "Loss-scale optimizers "
                           "skip overflow steps (expected now and then); non-finite steps are "
                           "applied with NaN/Inf.", "short",
                           query(f"sum(rate(gradwatch_skipped_steps_total{{{JOB}}}[{RATE}]))",
                                 "skipped"),
                           query(f"sum(rate(gradwatch_nonfinite_steps_total{{{JOB}}}[{RATE}]))",
                                 "non-finite")))
    )


DASHBOARDS = {"gradwatch-overview.json": overview, "gradwatch-job.json": job_detail}
CONFIGMAP = ROOT / "deploy" / "kubernetes" / "grafana-dashboards.yaml"


def render() -> dict[Path, str]:
    """Every generated file and its exact content."""
    files = {}
    for name, build in DASHBOARDS.items():
        files[ROOT / "dashboards" / name] = JSONEncoder(sort_keys=True, indent=2).encode(
            build().build()) + "\n"
    data = {name: files[ROOT / "dashboards" / name] for name in DASHBOARDS}
    configmap = {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "gradwatch-dashboards",
                     "labels": {"grafana_dashboard": "1",
                                "app.kubernetes.io/name": "gradwatch-collector"}},
        "data": data,
    }
    files[CONFIGMAP] = ("# Generated by dashboards/generate.py; do not edit.\n"
                        + json.dumps(configmap, indent=2, sort_keys=True) + "\n")
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a file is stale")
    args = parser.parse_args()
    stale = []
    for path, content in render().items():
        if path.exists() and path.read_text() == content:
            continue
        stale.append(path)
        if not args.check:
            path.write_text(content)
            print(f"wrote {path.relative_to(ROOT)}")
    if args.check and stale:
        print("stale: " + ", ".join(str(p.relative_to(ROOT)) for p in stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
