"""Grafana dashboards as code (grafana-foundation-sdk, pinned in pyproject.toml).

    .venv/bin/python dashboards/generate.py          # writes the JSON and the ConfigMap
    .venv/bin/python dashboards/generate.py --check  # exit 1 if they are stale

Writes ``dashboards/gradwatch-overview.json``, ``dashboards/gradwatch-job.json`` and
``deploy/kubernetes/grafana-dashboards.yaml`` (the same JSON in a ConfigMap labelled
for the Grafana sidecar). Every panel query is tested against a real Prometheus in
``tests/integration/test_dashboards.py``; ``tests/unit/test_dashboard_lint.py`` checks
the structure (thresholds, units, ids, links). The panels that alerts link to get their
ids from `gradwatch.collector.links`, the one place the collector and the dashboards
agree on them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import (
    bargauge,
    dashboard,
    heatmap,
    prometheus,
    stat,
    statetimeline,
    table,
    timeseries,
)
from grafana_foundation_sdk.builders.common import (
    GraphThresholdsStyleConfig,
    ReduceDataOptions,
    ScaleDistributionConfig,
    TableSortByFieldState,
    VizLegendOptions,
    VizTooltipOptions,
)
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import (
    BarGaugeDisplayMode,
    BigValueColorMode,
    BigValueGraphMode,
    GraphDrawStyle,
    GraphTresholdsStyleMode,
    HeatmapCellLayout,
    LegendDisplayMode,
    LegendPlacement,
    ScaleDistribution,
    SortOrder,
    TooltipDisplayMode,
    VisibilityMode,
    VizOrientation,
)
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DashboardLinkType,
    DataSourceRef,
    DataTransformerConfig,
    DynamicConfigValue,
    Threshold,
    ThresholdsMode,
    ValueMap,
    ValueMappingResult,
    VariableOption,
    VariableRefresh,
    VariableSort,
)
from grafana_foundation_sdk.models.heatmap import HeatmapColorMode, HeatmapColorScale

from gradwatch.collector.links import ALERT_PANELS, JOB_DASHBOARD_SLUG, JOB_DASHBOARD_UID

ROOT = Path(__file__).resolve().parents[1]
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
RATE = "$__rate_interval"
RANGE = "$__range"
JOB = 'training_job="$training_job"'
OPT = f'{JOB},optimizer=~"$optimizer"'
TASK = f'{OPT},task_type=~"$task_type",task_index=~"$task"'
VAR = f'{OPT},variable=~"$variable"'
TASK_LEGEND = "{{task_type}}/{{task_index}}"

#: Rule limits the thresholds show (defaults in collector/rules/*.py).
MAX_NORM = 1e6  # GradientExploding.max_norm
EPSILON = 1e-12  # GradientVanishing.epsilon
NORM_RATIO = 10.0  # ReplicaDivergence.norm_ratio
SILENT_S = 60.0  # WorkerSilent.seconds

Steps = list[tuple[float | None, str]]
#: Any count above 0 is a failure: missing, non-finite, dropped, firing.
RED_FROM_1: Steps = [(None, "green"), (1, "red")]
#: Worth knowing, not a failure (e.g. variables folded into __other__).
ORANGE_FROM_1: Steps = [(None, "green"), (1, "orange")]
#: A plain number: no state.
INFO: Steps = [(None, "blue")]
#: Report age: WorkerSilent fires at 60 s; half of that is late.
AGE: Steps = [(None, "green"), (SILENT_S / 2, "orange"), (SILENT_S, "red")]
#: A norm: red above GradientExploding's max_norm.
NORM: Steps = [(None, "green"), (MAX_NORM, "red")]

STEPS_PER_S = "suffix: steps/s"
PER_INTERVAL = "none"  # counts from increase(): whole events, no SI scaling
TIMES = "suffix:x"

#: Titles of the job dashboard's panels that alerts open (`ALERT_PANELS` gives their ids).
ALERT_PANEL_TITLES = {
    "GradientMissing": "Why gradients are missing",
    "GradientNonFinite": "Non-finite steps by task",
    "GradientExploding": "Top 10 variables by gradient norm",
    "GradientVanishing": "Bottom 10 variables by gradient norm",
    "ReplicaDivergence": "Replicas furthest from the median norm",
    "WorkerSilent": "Tasks",
}


# -- building blocks ---------------------------------------------------------------------------

def query(expr: str, legend: str = "", instant: bool = False, fmt: str = "time_series",
          ref: str = "A") -> prometheus.Dataquery:
    """A Prometheus query; ``instant`` ones are evaluated at the range's end, ``fmt``
    ``table`` for tables (one row per series) or ``time_series`` (one field per series)."""
    q = prometheus.Dataquery().expr(expr).datasource(DATASOURCE).ref_id(ref).format(fmt)
    if legend:
        q = q.legend_format(legend)
    if instant:
        q = q.instant()
    return q


def counted(selector: str) -> str:
    """The events a per-variable counter counted in each ``$__rate_interval`` (only series
    that counted any). A variable's series is born when it goes bad (until then the cap
    may fold it into ``__other__``), already holding its count, which ``increase()`` never
    sees: such a series counts its whole value in the interval it appears."""
    return (f"(increase({selector}[{RATE}]) > 0 or ({selector} > 0 unless {selector} "
            f"offset {RATE}) * 1)")


def thresholds(steps: Steps) -> dashboard.ThresholdsConfig:
    return dashboard.ThresholdsConfig().mode(ThresholdsMode.ABSOLUTE).steps(
        [Threshold(value=value, color=color) for value, color in steps])


def legend(mode: str) -> VizLegendOptions:
    """``list`` for a few series; ``table``: a scrolling table on the right with the last
    and max value, sortable; ``hidden`` (the tooltip names the series)."""
    if mode == "hidden":
        return VizLegendOptions().show_legend(False).display_mode(LegendDisplayMode.HIDDEN
                                                                  ).placement(
            LegendPlacement.BOTTOM).calcs([])
    if mode == "table":
        return (VizLegendOptions().show_legend(True).display_mode(LegendDisplayMode.TABLE)
                .placement(LegendPlacement.RIGHT).calcs(["lastNotNull", "max"])
                .sort_by("Max").sort_desc(True))
    return (VizLegendOptions().show_legend(True).display_mode(LegendDisplayMode.LIST)
            .placement(LegendPlacement.BOTTOM).calcs([]))


def series(title: str, description: str, unit: str, *targets: prometheus.Dataquery,
           log: bool = False, width: int = 12, height: int = 8, steps: Steps = INFO,
           line: bool = False, legend_mode: str = "list", bars: bool = False,
           no_value: str | None = None, decimals: int | None = None) -> timeseries.Panel:
    """A time series. ``line`` draws ``steps`` as dashed lines (the rule's limit);
    ``bars`` for counts per interval; ``log`` only where zero and NaN have a panel of
    their own (a log axis cannot draw either)."""
    tooltip = TooltipDisplayMode.SINGLE if legend_mode == "hidden" else TooltipDisplayMode.MULTI
    panel = (timeseries.Panel().title(title).description(description).unit(unit)
             .datasource(DATASOURCE).height(height).span(width).fill_opacity(10)
             .thresholds(thresholds(steps)).legend(legend(legend_mode))
             .tooltip(VizTooltipOptions().mode(tooltip).sort(SortOrder.DESCENDING)))
    if line:
        panel = panel.thresholds_style(
            GraphThresholdsStyleConfig().mode(GraphTresholdsStyleMode.DASHED))
    if log:
        panel = panel.scale_distribution(
            ScaleDistributionConfig().type(ScaleDistribution.LOG).log(10))
    if bars:
        panel = panel.draw_style(GraphDrawStyle.BARS).fill_opacity(80)
    if no_value is not None:
        panel = panel.no_value(no_value)
    if decimals is not None:
        panel = panel.decimals(decimals)
    for ref, target in zip("ABCDEFGH", targets, strict=False):
        panel = panel.with_target(target.ref_id(ref))
    return panel


def last_value() -> ReduceDataOptions:
    return ReduceDataOptions().calcs(["lastNotNull"]).values(False)


def single(title: str, description: str, unit: str, expr: str, steps: Steps,
           no_value: str | None = None, decimals: int | None = None, width: int = 3
           ) -> stat.Panel:
    """A stat: the whole background takes the threshold's colour when ``steps`` says
    anything but "blue" (plain numbers keep a coloured value)."""
    alarm = any(color != "blue" for _, color in steps)
    panel = (stat.Panel().title(title).description(description).unit(unit)
             .datasource(DATASOURCE).height(4).span(width).with_target(query(expr))
             .reduce_options(last_value()).graph_mode(BigValueGraphMode.AREA)
             .thresholds(thresholds(steps))
             .color_mode(BigValueColorMode.BACKGROUND if alarm else BigValueColorMode.VALUE))
    if no_value is not None:
        panel = panel.no_value(no_value)
    if decimals is not None:
        panel = panel.decimals(decimals)
    return panel


def organize(rename: dict[str, str], hide: tuple[str, ...] = (),
             order: tuple[str, ...] = ()) -> DataTransformerConfig:
    """Grafana's "organize fields": hides ``Time``, ``__name__``, Prometheus' own ``job``
    and ``instance`` (and ``hide``), renames and orders the rest."""
    excluded = {name: True for name in ("Time", "__name__", "job", "instance", *hide)}
    return DataTransformerConfig(id_val="organize", options={
        "excludeByName": excluded, "renameByName": rename,
        "indexByName": {name: i for i, name in enumerate(order)}})


def merge() -> DataTransformerConfig:
    """Grafana's "merge": the instant queries' frames become one table, one row per label
    set they share (each query's value in its own ``Value #X`` column)."""
    return DataTransformerConfig(id_val="merge", options={})


def column(panel: table.Panel, name: str, unit: str, steps: Steps,
           decimals: int | None = None) -> table.Panel:
    """A table column with its unit, and its cell coloured by ``steps``."""
    properties = [DynamicConfigValue(id_val="unit", value=unit),
                  DynamicConfigValue(id_val="thresholds", value=thresholds(steps).build()),
                  DynamicConfigValue(id_val="custom.cellOptions",
                                     value={"type": "color-background", "mode": "basic"})]
    if decimals is not None:
        properties.append(DynamicConfigValue(id_val="decimals", value=decimals))
    return panel.override_by_name(name, properties)


def grid(title: str, description: str, *targets: prometheus.Dataquery,
         height: int = 8, width: int = 24) -> table.Panel:
    """A table of instant queries (``format: table``), default unit ``none``."""
    panel = (table.Panel().title(title).description(description).datasource(DATASOURCE)
             .height(height).span(width).show_header(True).unit("none")
             .thresholds(thresholds(INFO)))
    for ref, target in zip("ABCDEFGH", targets, strict=False):
        panel = panel.with_target(target.ref_id(ref))
    return panel


def top_bars(title: str, description: str, expr: str, steps: Steps) -> bargauge.Panel:
    """One bar per series: an instant query in *time series* format, so that each series
    is its own field, reduced to its last value (a table-format query would be one
    frame with one "Value" column: one bar)."""
    return (bargauge.Panel().title(title).description(description).datasource(DATASOURCE)
            .height(8).span(12).orientation(VizOrientation.HORIZONTAL)
            .display_mode(BarGaugeDisplayMode.BASIC).reduce_options(last_value())
            .unit("sci").decimals(2).thresholds(thresholds(steps))
            .with_target(query(expr, "{{variable}}", instant=True)))


def datasource_variable() -> dashboard.DatasourceVariable:
    return dashboard.DatasourceVariable("datasource").label("Data source").type("prometheus")


def all_option() -> VariableOption:
    return VariableOption(selected=True, text="All", value="$__all")


def tagged_links() -> dashboard.DashboardLink:
    """Every gradwatch dashboard, keeping the time range and the variables."""
    return (dashboard.DashboardLink("gradwatch").type(DashboardLinkType.DASHBOARDS)
            .tags(["gradwatch"]).as_dropdown(False).include_vars(True).keep_time(True)
            .target_blank(False).icon("external link").tooltip("").url(""))


def job_link() -> dashboard.DashboardLink:
    """A data link from a row of a per-job table to that job's dashboard, same time."""
    return (dashboard.DashboardLink("Open the job dashboard").url(
        f"/d/{JOB_DASHBOARD_UID}/{JOB_DASHBOARD_SLUG}?var-datasource=${{datasource}}"
        "&var-training_job=${__data.fields.training_job}&${__url_time_range}"))


# -- overview ---------------------------------------------------------------------------------

#: Per-job columns of the overview's job table: query, column title, unit, thresholds.
JOB_COLUMNS: list[tuple[str, str, str, Steps]] = [
    ("count by (training_job) (count by (training_job, task_type, task_index) "
     "(gradwatch_last_report_timestamp_seconds))", "Running tasks", "none", INFO),
    (f"sum by (training_job) (rate(gradwatch_steps_total[{RATE}]))", "Steps/s", STEPS_PER_S,
     INFO),
    ("max by (training_job) (time() - gradwatch_last_report_timestamp_seconds)",
     "Report age", "s", AGE),
    ("sum by (training_job) (max by (training_job, optimizer) "
     "(gradwatch_variables_without_gradient))", "Variables without gradient", "none",
     RED_FROM_1),
    (f"sum by (training_job) (increase(gradwatch_nonfinite_steps_total[{RANGE}]))",
     "Non-finite steps", "none", RED_FROM_1),
    ("sum by (training_job) (gradwatch_alerts_active) or 0 * count by (training_job) "
     "(gradwatch_steps_total)", "Firing alerts", "none", RED_FROM_1),
    ("sum by (training_job) (gradwatch_variable_series_folded)", "Folded variables", "none",
     ORANGE_FROM_1),
]


def job_table() -> table.Panel:
    refs = "ABCDEFGH"
    panel = grid(
        "Jobs", "One row per training job with a running task or series still kept: click "
        "a job for its dashboard (same time range). Non-finite steps count over the "
        "dashboard's range; red means act.",
        *[query(expr, instant=True, fmt="table") for expr, *_ in JOB_COLUMNS])
    rename = {f"Value #{refs[i]}": title for i, (_, title, _, _) in enumerate(JOB_COLUMNS)}
    panel = (panel.with_transformation(merge())
             .with_transformation(organize({"training_job": "Job", **rename},
                                           order=("training_job", *rename)))
             .sort_by([dashboard_sort("Variables without gradient")]))
    panel = panel.override_by_name("Job", [DynamicConfigValue(
        id_val="links", value=[job_link().build()])])
    for _, title, unit, steps in JOB_COLUMNS:
        panel = column(panel, title, unit, steps, decimals=None if unit == "s" else 0)
    return panel


def dashboard_sort(name: str) -> TableSortByFieldState:
    """Sorts a table by column ``name``, largest first."""
    return TableSortByFieldState().display_name(name).desc(True)


def overview() -> dashboard.Dashboard:
    return (
        dashboard.Dashboard("gradwatch: overview").uid("gradwatch-overview")
        .description("Every training job watched by gradwatch: which one is broken, and a "
                     "click to its dashboard.")
        .tags(["gradwatch"]).refresh("30s").time("now-1h", "now")
        .tooltip(DashboardCursorSync.CROSSHAIR).link(tagged_links())
        .with_variable(datasource_variable())
        .with_row(dashboard.Row("Health"))
        .with_panel(single("Jobs running", "Training jobs with a task that reports now "
                           "(finished jobs, kept an hour, are not counted).", "none",
                           "count(count by (training_job) "
                           "(gradwatch_last_report_timestamp_seconds))", INFO, no_value="0"))
        .with_panel(single("Steps per second", "Training steps reported per second, all jobs "
                           "and tasks.", STEPS_PER_S,
                           f"sum(rate(gradwatch_steps_total[{RATE}]))", INFO))
        .with_panel(single("Oldest report", "The longest any running task has been silent; "
                           f"WorkerSilent fires at {SILENT_S:g} s.", "s",
                           "max(time() - gradwatch_last_report_timestamp_seconds)", AGE,
                           no_value="no running task"))
        .with_panel(single("Variables without gradient", "Per job and optimizer, the worst "
                           "task and replica at its latest step; summed over jobs. Red from 1.",
                           "none", "sum(max by (training_job, optimizer) "
                           "(gradwatch_variables_without_gradient))", RED_FROM_1,
                           no_value="0"))
        .with_panel(single("Non-finite steps", "Steps with NaN or Inf in any gradient during "
                           "the dashboard's range, all jobs (loss-scale skipped steps "
                           "excluded).", "none",
                           f"sum(increase(gradwatch_nonfinite_steps_total[{RANGE}]))",
                           RED_FROM_1, no_value="0", decimals=0))
        .with_panel(single("Dropped steps", "Steps the agents recorded but could not deliver "
                           "during the dashboard's range (buffers full while the collector "
                           "was away).", "none",
                           f"sum(increase(gradwatch_dropped_steps_total[{RANGE}]))",
                           RED_FROM_1, no_value="0", decimals=0))
        .with_panel(single("Firing gradient alerts", "Alerts the collectors fire now "
                           "(GradientMissing, GradientNonFinite, ...); 0 when none.", "none",
                           "sum(gradwatch_alerts_active) or vector(0)", RED_FROM_1,
                           no_value="0"))
        .with_panel(single("Folded variables", 'Variables beyond the per-job series cap, '
                           'shown together as variable="__other__" (never those that missed '
                           "a gradient or went NaN/Inf).", "none",
                           "sum(gradwatch_variable_series_folded)", ORANGE_FROM_1,
                           no_value="0"))
        .with_row(dashboard.Row("By job"))
        .with_panel(job_table())
        .with_row(dashboard.Row("Gradients"))
        .with_panel(series(
            "Variables without gradient by job", "Worst task and replica per job and "
            "optimizer, at the latest step; the line marks 1.", "none",
            query("max by (training_job, optimizer) (gradwatch_variables_without_gradient)",
                  "{{training_job}} {{optimizer}}"), steps=RED_FROM_1, line=True,
            no_value="0", decimals=0))
        .with_panel(series(
            "Non-finite steps by task", "Steps with NaN/Inf per task in each "
            "$__rate_interval window; only tasks that had any. Replica detail: the job "
            "dashboard.", PER_INTERVAL,
            query(f"sum by (training_job, task_type, task_index) (increase("
                  f"gradwatch_nonfinite_steps_total[{RATE}])) > 0",
                  "{{training_job}} " + TASK_LEGEND), bars=True, steps=RED_FROM_1,
            no_value="none", decimals=0))
        .with_panel(series(
            "Global gradient norm by job", "Largest and smallest L2 norm over each job's "
            f"tasks and replicas (log scale; the line is GradientExploding's max_norm "
            f"{MAX_NORM:g}). Zero and NaN cannot show on a log axis: see the panels beside.",
            "sci", query("max by (training_job, optimizer) (gradwatch_global_gradient_norm)",
                         "{{training_job}} {{optimizer}} max"),
            query("min by (training_job, optimizer) (gradwatch_global_gradient_norm)",
                  "{{training_job}} {{optimizer}} min"), log=True, steps=NORM, line=True))
        .with_panel(series(
            "Replicas with a NaN or Inf global norm", "Per job, task and replica whose latest "
            "global norm is NaN or Inf; only those.", "none",
            query("count by (training_job, task_type, task_index, replica) "
                  "(gradwatch_global_gradient_norm unless gradwatch_global_gradient_norm "
                  "< +Inf)", "{{training_job}} " + TASK_LEGEND + " r{{replica}}"),
            bars=True, steps=RED_FROM_1, no_value="none", decimals=0))
        .with_panel(series(
            "Steps per second by job", "Training throughput as reported by the agents; a flat "
            "line at 0 with a recent report means a stalled step.", STEPS_PER_S,
            query(f"sum by (training_job) (rate(gradwatch_steps_total[{RATE}]))",
                  "{{training_job}}")))
        .with_panel(series(
            "Oldest report by job", "Seconds since the most silent running task of each job "
            f"reported; WorkerSilent fires at the line ({SILENT_S:g} s). Finished tasks leave "
            "the graph.", "s",
            query("max by (training_job) (time() - gradwatch_last_report_timestamp_seconds)",
                  "{{training_job}}"), steps=AGE, line=True))
        .with_panel(series(
            "NaN and Inf gradient values by job", "Elements counted by the agents in each "
            "$__rate_interval window, all variables of a job; only jobs that had any.",
            PER_INTERVAL,
            query(f"sum by (training_job) {counted('gradwatch_gradient_nan_values_total')}",
                  "{{training_job}} NaN"),
            query(f"sum by (training_job) {counted('gradwatch_gradient_inf_values_total')}",
                  "{{training_job}} Inf"),
            bars=True, steps=RED_FROM_1, no_value="none", decimals=0))
        .with_panel(series(
            "Firing alerts by job", "Alerts firing, by job, alert name and severity (the "
            "alert annotations mark when each started and ended).", "none",
            query("sum by (training_job, alertname, severity) (gradwatch_alerts_active)",
                  "{{training_job}} {{alertname}} ({{severity}})"),
            steps=RED_FROM_1, no_value="none", decimals=0))
    )


# -- one job ----------------------------------------------------------------------------------

def job_variables() -> list[Any]:
    job = (dashboard.QueryVariable("training_job").label("Training job").datasource(DATASOURCE)
           .query("query_result(sort_desc(max by (training_job) (max_over_time("
                  f"gradwatch_last_report_timestamp_seconds[{RANGE}]))))")
           .regex('/training_job="([^"]+)"/')
           .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).sort(VariableSort.DISABLED))

    def multi(name: str, label: str, definition: str, sort: VariableSort
              ) -> dashboard.QueryVariable:
        return (dashboard.QueryVariable(name).label(label).datasource(DATASOURCE)
                .query(definition).refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).sort(sort)
                .multi(True).include_all(True).all_value(".*").current(all_option()))

    return [
        datasource_variable(), job,
        multi("optimizer", "Optimizer", f"label_values(gradwatch_steps_total{{{JOB}}}, "
              "optimizer)", VariableSort.ALPHABETICAL_ASC),
        multi("task_type", "Task type", f"label_values(gradwatch_steps_total{{{OPT}}}, "
              "task_type)", VariableSort.ALPHABETICAL_ASC),
        multi("task", "Task index", f"label_values(gradwatch_steps_total{{{OPT},"
              'task_type=~"$task_type"}, task_index)', VariableSort.NUMERICAL_ASC),
        multi("variable", "Variable", f"label_values(gradwatch_gradient_norm{{{OPT}}}, "
              "variable)", VariableSort.ALPHABETICAL_ASC),
    ]


LAG = (f"max by (training_job, task_type, task_index) (max by (training_job, optimizer) "
       f"(gradwatch_last_step{{{OPT}}}) - on (training_job, optimizer) group_right "
       f"gradwatch_last_step{{{TASK}}})")
REPORT_AGE = (f"max by (training_job, task_type, task_index) (time() - "
              f"gradwatch_last_report_timestamp_seconds{{{TASK}}})")
NONFINITE_REPLICAS = (f"gradwatch_global_gradient_norm{{{TASK}}} unless "
                      f"gradwatch_global_gradient_norm{{{TASK}}} < +Inf")
MEDIAN_RATIO = (f"gradwatch_global_gradient_norm{{{TASK}}} / on (training_job, optimizer) "
                f"group_left quantile by (training_job, optimizer) (0.5, "
                f"gradwatch_global_gradient_norm{{{OPT}}})")

#: Columns of the job dashboard's task table.
TASK_COLUMNS: list[tuple[str, str, str, Steps]] = [
    (f"max by (training_job, task_type, task_index) (gradwatch_last_step{{{TASK}}})",
     "Last step", "none", INFO),
    (LAG, "Step lag", "none", [(None, "green"), (100, "orange")]),
    (REPORT_AGE, "Report age", "s", AGE),
    (f"sum by (training_job, task_type, task_index) (rate(gradwatch_steps_total{{{TASK}}}"
     f"[{RATE}]))", "Steps/s", STEPS_PER_S, INFO),
    (f"sum by (training_job, task_type, task_index) (increase("
     f"gradwatch_nonfinite_steps_total{{{TASK}}}[{RANGE}]))", "Non-finite steps", "none",
     RED_FROM_1),
    (f"sum by (training_job, task_type, task_index) (gradwatch_dropped_steps_total"
     f"{{{TASK}}})", "Dropped steps", "none", RED_FROM_1),
]


def task_table() -> table.Panel:
    refs = "ABCDEFGH"
    info = query(f'max by (training_job, task_type, task_index, hostname, pod, pid) '
                 f'(gradwatch_task_info{{{JOB},task_type=~"$task_type",'
                 'task_index=~"$task"})', instant=True,
                 fmt="table")
    panel = grid(
        "Tasks", "One row per task: where it runs (host, pod, pid, from its registration), "
        "its last step and how far it is behind the job's newest step (per optimizer), "
        f"seconds since it reported (WorkerSilent at {SILENT_S:g} s), NaN/Inf steps in the "
        "range and dropped steps. Sorted by report age.",
        *[query(expr, instant=True, fmt="table") for expr, *_ in TASK_COLUMNS], info,
        height=10)
    rename = {f"Value #{refs[i]}": title for i, (_, title, _, _) in enumerate(TASK_COLUMNS)}
    panel = (panel.with_transformation(merge())
             .with_transformation(organize(
                 {"task_type": "Type", "task_index": "Index", "hostname": "Host",
                  "pod": "Pod", "pid": "PID", **rename},
                 hide=("training_job", f"Value #{refs[len(TASK_COLUMNS)]}"),
                 order=("task_type", "task_index", "hostname", "pod", "pid", *rename)))
             .sort_by([dashboard_sort("Report age")]))
    for _, title, unit, steps in TASK_COLUMNS:
        panel = column(panel, title, unit, steps, decimals=None if unit != "none" else 0)
    return panel


def cause_table() -> table.Panel:
    return (grid("Why gradients are missing", "The agent's diagnosis for each variable "
                 "without gradient now: the cause, and the op and source line that break the "
                 "path to the loss (docs/diagnosis.md).",
                 query(f"gradwatch_gradient_missing_cause_info{{{OPT}}}", instant=True,
                       fmt="table"))
            .with_transformation(organize(
                {"variable": "Variable", "optimizer": "Optimizer", "cause": "Cause",
                 "op_type": "Op type", "op": "Op", "source": "Source"},
                hide=("training_job", "Value"),
                order=("variable", "optimizer", "cause", "op_type", "op", "source"))))


def replica_table() -> table.Panel:
    factor = f"({MEDIAN_RATIO}) >= 1 or 1 / ({MEDIAN_RATIO})"
    return (grid("Replicas furthest from the median norm", "The 10 task replicas whose latest "
                 "global norm is furthest from their optimizer's median, as a factor either "
                 f"way; ReplicaDivergence compares max/min with {NORM_RATIO:g}x. A norm of 0 "
                 "reads Inf; NaN norms are on \"Replicas with a NaN or Inf global norm\".",
                 query(f"topk(10, {factor})", instant=True, fmt="table"), height=8, width=12)
            .with_transformation(organize(
                {"task_type": "Type", "task_index": "Index", "replica": "Replica",
                 "optimizer": "Optimizer", "Value": "x median"},
                hide=("training_job",),
                order=("task_type", "task_index", "replica", "optimizer", "Value")))
            .sort_by([dashboard_sort("x median")])
            .override_by_name("x median", [
                DynamicConfigValue(id_val="unit", value=TIMES),
                DynamicConfigValue(id_val="decimals", value=1),
                DynamicConfigValue(id_val="thresholds", value=thresholds(
                    [(None, "green"), (NORM_RATIO ** 0.5, "orange"), (NORM_RATIO, "red")]
                ).build()),
                DynamicConfigValue(id_val="custom.cellOptions",
                                   value={"type": "color-background", "mode": "basic"})]))


def heat_map() -> heatmap.Panel:
    """Rows: variables in model order (the ``position`` label of
    ``gradwatch_variable_info`` sorts the series), columns: time, colour: log10 norm."""
    expr = (f"clamp(log10(gradwatch_gradient_norm{{{VAR}}}), -12, 12) * on (training_job, "
            f"optimizer, variable) group_left (position) gradwatch_variable_info{{{VAR}}}")
    return (heatmap.Panel().title("Gradient norm heat map (log10, model order)")
            .description("One row per variable, input layers at the bottom, output at the top "
                         "(model order), one column per interval; the colour is log10 of the "
                         "gradient norm, clamped to [-12, 12]. A missing gradient (norm 0) is the "
                         "floor, -12; Inf the ceiling, 12; NaN an empty cell: the presence and "
                         "NaN/Inf panels name them.")
            .datasource(DATASOURCE).height(14).span(24).calculate(False)
            .unit("none").decimals(1).thresholds(thresholds(INFO))
            .color(heatmap.HeatmapColorOptions().mode(HeatmapColorMode.SCHEME)
                   .scheme("Spectral").scale(HeatmapColorScale.LINEAR).steps(64)
                   .reverse(True).fill("dark-orange").exponent(0.5))
            .rows_frame(heatmap.RowsHeatmapOptions().layout(HeatmapCellLayout.UNKNOWN)
                        .value("log10 norm"))
            .y_axis(heatmap.YAxisConfig().unit("none"))
            .cell_values(heatmap.CellValues().unit("none").decimals(1))
            .show_value(VisibilityMode.NEVER).show_tooltip().show_legend()
            # Hide no cell: the default hides values <= 1e-9, i.e. every log10 norm below 0.
            .filter_values(heatmap.FilterValueRange().le(-1000))
            .with_target(query(expr, "{{position}} {{variable}}")))


def presence() -> statetimeline.Panel:
    mapping = ValueMap({"0": ValueMappingResult(text="missing", color="red", index=0),
                        "1": ValueMappingResult(text="present", color="green", index=1)})
    expr = (f"gradwatch_gradient_present{{{VAR}}} and on (training_job, optimizer, variable) "
            f"(min_over_time(gradwatch_gradient_present{{{VAR}}}[{RANGE}] @ end()) == 0)")
    return (statetimeline.Panel().title("Gradient present").description(
        "Only variables that missed a gradient somewhere in the dashboard's range: green while "
        "every task and replica has one, red while some do not. When it started and whether "
        "it came back.")
        .datasource(DATASOURCE).height(10).span(24).mappings([mapping]).unit("none")
        .thresholds(thresholds(RED_FROM_1)).show_value(VisibilityMode.NEVER)
        .merge_values(True).no_value("no variable missed a gradient in this range")
        .legend(legend("hidden"))
        .with_target(query(expr, "{{variable}}")))


def job_detail() -> dashboard.Dashboard:
    board = (
        dashboard.Dashboard("gradwatch: job").uid(JOB_DASHBOARD_UID)
        .description("One training job: which tasks, which variables, since when and why.")
        .tags(["gradwatch"]).refresh("30s").time("now-1h", "now")
        .tooltip(DashboardCursorSync.CROSSHAIR).link(tagged_links())
        .variables(job_variables())
        .with_row(dashboard.Row("Job"))
        .with_panel(single("Steps per second", "All tasks of the job; 0 means stalled or "
                           "finished.", STEPS_PER_S,
                           f"sum(rate(gradwatch_steps_total{{{OPT}}}[{RATE}]))",
                           [(None, "red"), (1e-9, "green")], no_value="0"))
        .with_panel(single("Running tasks", "Tasks that report now (finished ones are kept an "
                           "hour without a report timestamp).", "none",
                           f"count(count by (task_type, task_index) "
                           f"(gradwatch_last_report_timestamp_seconds{{{OPT}}}))", INFO,
                           no_value="0"))
        .with_panel(single("Oldest report", f"The most silent running task; WorkerSilent "
                           f"fires at {SILENT_S:g} s.", "s",
                           f"max(time() - gradwatch_last_report_timestamp_seconds{{{OPT}}})",
                           AGE, no_value="no running task"))
        .with_panel(single("Firing alerts", "Alerts the collector fires for this job now.",
                           "none", f"sum(gradwatch_alerts_active{{{OPT}}}) or vector(0)",
                           RED_FROM_1, no_value="0"))
        .with_panel(single("Variables without gradient", "Worst task and replica at the "
                           "latest step, per optimizer, summed over optimizers.", "none",
                           f"sum(max by (optimizer) (gradwatch_variables_without_gradient"
                           f"{{{OPT}}}))", RED_FROM_1, no_value="0"))
        .with_panel(single("Non-finite steps", "Steps with NaN/Inf during the dashboard's "
                           "range, all tasks.", "none",
                           f"sum(increase(gradwatch_nonfinite_steps_total{{{OPT}}}[{RANGE}]))",
                           RED_FROM_1, no_value="0", decimals=0))
        .with_panel(single("Dropped steps", "Steps the agents recorded but could not deliver "
                           "during the dashboard's range.", "none",
                           f"sum(increase(gradwatch_dropped_steps_total{{{OPT}}}[{RANGE}]))",
                           RED_FROM_1, no_value="0", decimals=0))
        .with_panel(single("Folded variables", 'Variables sharing variable="__other__" beyond '
                           "the series cap (never one that missed a gradient or went NaN/Inf).",
                           "none", f"sum(gradwatch_variable_series_folded{{{OPT}}})",
                           ORANGE_FROM_1, no_value="0"))
        .with_panel(cause_table())
        .with_panel(series("Firing alerts by name", "By alert name, severity and optimizer "
                           "(the alert annotations mark when each started and ended).", "none",
                           query(f"sum by (alertname, severity, optimizer) "
                                 f"(gradwatch_alerts_active{{{OPT}}})",
                                 "{{alertname}} ({{severity}}) {{optimizer}}"),
                           width=24, height=6, steps=RED_FROM_1, no_value="none", decimals=0))
        .with_row(dashboard.Row("Tasks"))
        .with_panel(task_table())
        .with_panel(series(
            "Non-finite steps by task", "Steps with NaN/Inf per task and optimizer in each "
            "$__rate_interval window; only tasks that had any: which worker went bad first.",
            PER_INTERVAL,
            query(f"sum by (task_type, task_index, optimizer) (increase("
                  f"gradwatch_nonfinite_steps_total{{{TASK}}}[{RATE}])) > 0",
                  TASK_LEGEND + " {{optimizer}}"), bars=True, steps=RED_FROM_1,
            no_value="none", decimals=0))
        .with_panel(series(
            "Replicas with a NaN or Inf global norm", "Task replicas whose latest global norm "
            "is NaN or Inf; only those.", "none",
            query(f"count by (task_type, task_index, replica, optimizer) "
                  f"({NONFINITE_REPLICAS})", TASK_LEGEND + " r{{replica}} {{optimizer}}"),
            bars=True, steps=RED_FROM_1, no_value="none", decimals=0))
        .with_panel(series(
            "Step lag (10 furthest behind)", "The job's newest step minus each task's latest "
            "step (per optimizer); a task that falls behind is slow or stuck.", "none",
            query(f"topk(10, {LAG})", TASK_LEGEND), legend_mode="table", decimals=0))
        .with_panel(series(
            "Report age (10 oldest)", "Seconds since each running task reported; "
            f"WorkerSilent fires at the line ({SILENT_S:g} s).", "s",
            query(f"topk(10, {REPORT_AGE})", TASK_LEGEND), steps=AGE, line=True,
            legend_mode="table"))
    )
    variables = (
        dashboard.Row("Variables").collapsed(True)
        .with_panel(heat_map())
        .with_panel(presence())
        .with_panel(top_bars(ALERT_PANEL_TITLES["GradientExploding"], "Largest gradient norms "
                             f"at the latest step; red above max_norm ({MAX_NORM:g}).",
                             f"topk(10, gradwatch_gradient_norm{{{VAR}}})", NORM))
        .with_panel(top_bars(ALERT_PANEL_TITLES["GradientVanishing"], "Smallest norms of "
                             "the gradients present at the latest step (a dead layer's 0 "
                             "included; missing ones: see presence); red at or below epsilon "
                             f"({EPSILON:g}).",
                             f"bottomk(10, gradwatch_gradient_norm{{{VAR}}} and on "
                             "(training_job, optimizer, variable) "
                             f"gradwatch_gradient_present{{{VAR}}} == 1)",
                             [(None, "red"), (EPSILON * 1.000001, "green")]))
        .with_panel(series(
            "Share of steps without gradient", "Per variable, task-replica steps without a "
            "gradient / all task-replica steps of the optimizer, per $__rate_interval: 100 % "
            "is a broken graph, less is a branch taken on some steps. Only variables that "
            "missed.", "percentunit",
            query(f"{counted(f'gradwatch_gradient_missing_steps_total{{{VAR}}}')} / on "
                  f"(training_job, optimizer) group_left sum by (training_job, optimizer) "
                  f"(increase(gradwatch_steps_total{{{OPT}}}[{RATE}]) * on (training_job, "
                  f"optimizer, task_type, task_index) count by (training_job, optimizer, "
                  f"task_type, task_index) (gradwatch_global_gradient_norm{{{OPT}}}))",
                  "{{variable}}"), steps=RED_FROM_1, legend_mode="table",
            no_value="no variable missed"))
        .with_panel(series(
            "NaN and Inf values by variable", "Elements per variable in each $__rate_interval "
            "window; only variables that had any.", PER_INTERVAL,
            query(counted(f"gradwatch_gradient_nan_values_total{{{VAR}}}"), "{{variable}} NaN"),
            query(counted(f"gradwatch_gradient_inf_values_total{{{VAR}}}"), "{{variable}} Inf"),
            bars=True, steps=RED_FROM_1, legend_mode="table",
            no_value="none", decimals=0))
    )
    replicas = (
        dashboard.Row("Replicas and workers").collapsed(True)
        .with_panel(series(
            "Divergence: max / min global norm", "Per optimizer, over the selected tasks' "
            f"replicas with a finite norm above 0; ReplicaDivergence fires above the line "
            f"({NORM_RATIO:g}x). Replicas at 0 or NaN/Inf are counted on the right axis "
            "(bars): they diverge too. Which replica: the table beside.", TIMES,
            query(f"max by (optimizer) (gradwatch_global_gradient_norm{{{TASK}}} < +Inf) / "
                  f"min by (optimizer) (gradwatch_global_gradient_norm{{{TASK}}} > 0 < +Inf)",
                  "{{optimizer}} max/min"),
            query(f"count by (optimizer) (gradwatch_global_gradient_norm{{{TASK}}} == 0 or "
                  f"({NONFINITE_REPLICAS}))", "{{optimizer}} replicas at 0 or NaN/Inf"),
            steps=[(None, "green"), (NORM_RATIO, "red")], line=True)
            .override_by_query("B", [
                DynamicConfigValue(id_val="unit", value="none"),
                DynamicConfigValue(id_val="custom.axisPlacement", value="right"),
                DynamicConfigValue(id_val="custom.drawStyle", value="bars"),
                DynamicConfigValue(id_val="color", value={"mode": "fixed",
                                                          "fixedColor": "red"})]))
        .with_panel(replica_table())
        .with_panel(series(
            "Global gradient norm by task and replica", "Replicas of one step should agree "
            f"(log scale; the line is max_norm {MAX_NORM:g}). Zero and NaN cannot show on a "
            "log axis: see the divergence panel and \"Replicas with a NaN or Inf global "
            "norm\". Narrow with $task_type and $task.", "sci",
            query(f"gradwatch_global_gradient_norm{{{TASK}}}",
                  TASK_LEGEND + " r{{replica}} {{optimizer}}"), log=True, steps=NORM,
            line=True, legend_mode="table", width=24))
        .with_panel(series(
            "Skipped and dropped steps", "Per optimizer in each $__rate_interval window: "
            "loss-scale optimizers skip overflow steps (expected now and then); dropped steps "
            "never reached the collector.", PER_INTERVAL,
            query(f"sum by (optimizer) (increase(gradwatch_skipped_steps_total{{{TASK}}}"
                  f"[{RATE}]))", "{{optimizer}} skipped"),
            query(f"sum by (optimizer) (increase(gradwatch_dropped_steps_total{{{TASK}}}"
                  f"[{RATE}]))", "{{optimizer}} dropped"), bars=True, decimals=0, width=24,
            height=6))
    )
    return board.with_row(variables).with_row(replicas)


# -- output -----------------------------------------------------------------------------------

def alerts_annotation(selector: str) -> dict[str, Any]:
    """A Prometheus annotation query: a region on every time series panel while an alert of
    ``gradwatch_alerts_active`` fires (Grafana joins consecutive samples into one region)."""
    return {
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "enable": True, "hide": False, "iconColor": "red", "name": "gradwatch alerts",
        "expr": f"gradwatch_alerts_active{selector}", "step": "30s",
        "titleFormat": "{{alertname}} ({{severity}})",
        "textFormat": "{{training_job}} {{optimizer}}",
        "tagKeys": "alertname,severity,training_job,optimizer", "useValueForTime": False,
    }


def panels(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, rows and those inside collapsed rows included, in dashboard order."""
    found = []
    for panel in data["panels"]:
        found.append(panel)
        found += panel.get("panels", [])
    return found


def finish(data: dict[str, Any], annotation: str) -> dict[str, Any]:
    """What the SDK leaves out: panel ids (alert panels get theirs from
    `ALERT_PANELS`, the rest count up from 1) and the alerts annotation."""
    reserved = set(ALERT_PANELS.values())
    by_title = {ALERT_PANEL_TITLES[name]: panel for name, panel in ALERT_PANELS.items()}
    next_id = 1
    for panel in panels(data):
        if (data["uid"] == JOB_DASHBOARD_UID and panel["type"] != "row"
                and panel["title"] in by_title):
            panel["id"] = by_title[panel["title"]]
            continue
        while next_id in reserved:
            next_id += 1
        panel["id"] = next_id
        next_id += 1
    data["annotations"] = {"list": [alerts_annotation(annotation)]}
    return data


DASHBOARDS = {"gradwatch-overview.json": (overview, ""),
              "gradwatch-job.json": (job_detail, f"{{{OPT}}}")}
CONFIGMAP = ROOT / "deploy" / "kubernetes" / "grafana-dashboards.yaml"


def build(name: str) -> dict[str, Any]:
    """The dashboard ``name`` (a key of `DASHBOARDS`) as Grafana's JSON model."""
    make, annotation = DASHBOARDS[name]
    return finish(json.loads(JSONEncoder().encode(make().build())), annotation)


def render() -> dict[Path, str]:
    """Every generated file and its exact content."""
    files = {}
    for name in DASHBOARDS:
        files[ROOT / "dashboards" / name] = json.dumps(build(name), sort_keys=True,
                                                       indent=2) + "\n"
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
