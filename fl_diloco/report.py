"""`fl-diloco report SWEEP_DIR`: one table and two plots for a sweep of runs.

A sweep directory holds one directory per job (what `fl-diloco train -m` writes, listed in
its sweep.json; any directory of run directories works too, e.g. bench/overlap_ablation.py's).
A single run's out_dir is reported as a sweep of one job.
Runs whose configs differ only by `seed` are one row: the table shows the mean ± the sample
standard deviation over the seeds, and n, so that a difference smaller than the spread between
seeds is not read as an effect. Outputs, in --out (default: the sweep directory):

  report.md                  the Markdown table, the baseline it compares with, failed jobs
  eval_loss_vs_tokens.png    eval loss against training tokens, one line per row
  eval_loss_vs_H.png         final eval loss against H (inner steps), one line per variant;
                             only when some variant ran at two or more H
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fl_diloco.atomic import atomic_write
from fl_diloco.config import DEFAULTS, RunConfig
from fl_diloco.reporting import FAILED_NAME, METRICS_NAME, SUMMARY_NAME, format_bytes

SWEEP_INDEX_NAME = "sweep.json"
REPORT_NAME = "report.md"
TOKENS_PLOT_NAME = "eval_loss_vs_tokens.png"
H_PLOT_NAME = "eval_loss_vs_H.png"
# Keys that never make two runs different variants: seeds are averaged over, paths are where.
NOT_A_VARIANT = ("seed", "out_dir", "overwrite", "resume")
# Keys the report always states when every run shares them: what a reader asks first.
ALWAYS_STATED = ("model", "num_clients", "inner_steps", "rounds")
# Keys that RunConfig.variant_label already spells out.
IN_VARIANT_LABEL = ("algorithm", "delay", "streaming", "fragments", "overlap_steps", "mixing",
                    "wire_precision")


class ReportError(ValueError):
    """The directory cannot be reported on; the message says why and what to pass instead."""


@dataclass
class Job:
    """One job of a sweep as found on disk."""

    name: str
    # "completed" (summary.json), "failed" (failed.json), "interrupted" (its sweep was stopped
    # while it ran) or "incomplete" (still running, or stopped in a way nothing recorded)
    status: str
    overrides: list[str] = field(default_factory=list)
    config: dict[str, Any] | None = None
    summary: dict[str, Any] | None = None
    out_dir: Path | None = None
    error: str | None = None

    @property
    def eval_history(self) -> list[tuple[int, float]]:
        """(tokens, eval loss) at every evaluation: from summary.json, else metrics.jsonl."""
        if self.summary and self.summary.get("eval_history"):
            return [(h["tokens"], h["eval_loss"]) for h in self.summary["eval_history"]
                    if h.get("eval_loss") is not None]
        path = self.out_dir / METRICS_NAME if self.out_dir else None
        if not path or not path.exists():
            return []
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [(r["tokens_total"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]


@dataclass
class Stat:
    """Mean and sample standard deviation over seeds (std is None for fewer than 2 values)."""

    mean: float | None
    std: float | None
    n: int

    @classmethod
    def of(cls, values: list[float | None]) -> Stat:
        present = [v for v in values if v is not None and not math.isnan(v)]
        if not present:
            return cls(None, None, 0)
        std = statistics.stdev(present) if len(present) > 1 else None
        return cls(statistics.fmean(present), std, len(present))

    def format(self, spec: str) -> str:
        if self.mean is None:
            return "-"
        text = format(self.mean, spec)
        return text if self.std is None else f"{text} ± {format(self.std, spec)}"


@dataclass
class Row:
    """One variant: the completed runs whose configs differ only by seed."""

    label: str
    config: dict[str, Any]
    runs: list[Job]

    @property
    def seeds(self) -> list[int]:
        return sorted(run.config["seed"] for run in self.runs if run.config and "seed" in run.config)

    def stat(self, key: str) -> Stat:
        return Stat.of([run.summary.get(key) for run in self.runs])


# --------------------------------------------------------------------------------------
# Reading a sweep


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def load_jobs(sweep_dir: Path) -> list[Job]:
    """Every job of the sweep, in the order they were run; raises ReportError if there are none."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise ReportError(f"{sweep_dir} is not a directory; pass a sweep directory "
                          f"(what `fl-diloco train -m` printed after 'report:')")
    index = _read_json(sweep_dir / SWEEP_INDEX_NAME)
    if is_run_dir(sweep_dir) and not index:
        return [_load_job(sweep_dir, sweep_dir, [])]
    if index and index.get("jobs"):
        # Paths are relative to the sweep directory (absolute for an out_dir set outside it).
        places = [(sweep_dir / job["job_dir"], sweep_dir / (job.get("out_dir") or job["job_dir"]),
                   job.get("overrides", [])) for job in index["jobs"]]
    else:
        # No index (a sweep from another tool, or one interrupted before its first job
        # ended): every subdirectory that holds a run, in job-number order.
        def order(path: Path) -> tuple[int, str]:
            number = path.name.split("-", 1)[0]
            return (int(number) if number.isdigit() else sys.maxsize, path.name)

        places = [(d, d, []) for d in sorted(sweep_dir.iterdir(), key=order)
                  if d.is_dir() and any((d / name).exists() for name in (SUMMARY_NAME, "config.json", FAILED_NAME))]
    jobs = [_load_job(*place) for place in places]
    if index and index.get("jobs"):
        _mark_interrupted(sweep_dir, index, jobs)
    if not jobs:
        raise ReportError(f"no runs in {sweep_dir}: expected {SWEEP_INDEX_NAME} or subdirectories "
                          f"with {SUMMARY_NAME}, config.json or {FAILED_NAME}")
    return jobs


def is_run_dir(path: Path) -> bool:
    """Whether `path` is one run's out_dir (what `fl-diloco train` writes), not a sweep."""
    return (path / SUMMARY_NAME).is_file() or (path / METRICS_NAME).is_file()


def _process_gone(index: dict[str, Any]) -> bool:
    """Whether the sweep process that wrote `index` has ended. False when that cannot be told
    from here (another machine, an index without a pid)."""
    pid = index.get("pid")
    if not isinstance(pid, int) or index.get("host") != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except OSError:  # e.g. PermissionError: the pid belongs to a live process of someone else
        pass
    return False


def save_sweep_index(sweep_dir: Path, index: dict[str, Any]) -> Path:
    """Write sweep.json atomically: the sweep rewrites it after every job, and a report may
    read it at any moment."""
    path = sweep_dir / SWEEP_INDEX_NAME
    atomic_write(path, lambda f: f.write(json.dumps(index, indent=2).encode()))
    return path


def _mark_interrupted(sweep_dir: Path, index: dict[str, Any], jobs: list[Job]) -> None:
    """Jobs the index calls `running` whose sweep process is gone were stopped mid-run (e.g.
    SIGKILL, which leaves no trace): call them `interrupted`, here and in sweep.json."""
    gone = _process_gone(index)
    changed = False
    for entry, job in zip(index["jobs"], jobs):
        if job.status != "incomplete":
            continue
        if entry.get("status") == "running" and gone:
            entry["status"], changed = "interrupted", True
        if entry.get("status") == "interrupted":
            job.status = "interrupted"
            job.error = job.error or "the sweep was stopped while this job ran; run it again"
    if changed:
        try:  # best effort: the report is still right if the sweep directory is read-only
            save_sweep_index(sweep_dir, index)
        except OSError:
            pass


def _load_job(job_dir: Path, out_dir: Path, overrides: list[str]) -> Job:
    summary = _read_json(out_dir / SUMMARY_NAME)
    failure = _read_json(job_dir / FAILED_NAME)
    config = (summary or {}).get("config") or _read_json(out_dir / "config.json")
    if summary:
        status = "completed"
    elif failure:
        status, config = "failed", config or failure.get("config")
    else:
        status = "incomplete"
    return Job(name=job_dir.name, status=status, overrides=overrides or (failure or {}).get("overrides", []),
               config=config, summary=summary, out_dir=out_dir,
               error=(failure or {}).get("error"))


# --------------------------------------------------------------------------------------
# Aggregating


def _variant_key(config: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in sorted(config.items()) if k not in NOT_A_VARIANT})


def varying_keys(configs: list[dict[str, Any]]) -> list[str]:
    """The config keys (seed and paths aside) whose values are not the same in every run."""
    keys = sorted({k for c in configs for k in c} - set(NOT_A_VARIANT))
    return [k for k in keys if len({json.dumps(c.get(k)) for c in configs}) > 1]


def variant_label(config: dict[str, Any], varying: list[str], exclude: tuple[str, ...] = ()) -> str:
    """RunConfig's short name for the variant, plus the other keys that vary in the sweep."""
    try:
        label = RunConfig.from_mapping({k: v for k, v in config.items() if k in RunConfig.keys()}).variant_label
    except ValueError:  # a run from an older version of the config: say what it was
        label = str(config.get("algorithm", "?"))
    extras = [f"{k}={config.get(k)}" for k in varying if k not in IN_VARIANT_LABEL and k not in exclude]
    return ", ".join([label, *extras])


def group_rows(jobs: list[Job]) -> list[Row]:
    """Completed runs grouped into rows by everything but the seed, in the order first run."""
    done = [job for job in jobs if job.status == "completed" and job.config]
    varying = varying_keys([job.config for job in done])
    rows: dict[str, Row] = {}
    for job in done:
        key = _variant_key(job.config)
        if key not in rows:
            rows[key] = Row(variant_label(job.config, varying), job.config, [])
        rows[key].runs.append(job)
    result = list(rows.values())
    # variant_label hides keys that do not matter to an algorithm (delay for diloco, say); if
    # two rows still read alike, spell out every varying key.
    labels = [row.label for row in result]
    for row in result:
        if labels.count(row.label) > 1:
            row.label = ", ".join(f"{k}={row.config.get(k)}" for k in varying)
    return result


def shared_settings(rows: list[Row]) -> str:
    """The settings every row has in common: the main ones, and the others that are not defaults."""
    configs = [row.config for row in rows]
    varying = set(varying_keys(configs)) | set(NOT_A_VARIANT)
    first = configs[0]
    keys = [k for k in ALWAYS_STATED if k in first and k not in varying]
    keys += [k for k in first if k not in varying and k not in keys and k in DEFAULTS and first[k] != DEFAULTS[k]]
    return " ".join(f"{k}={first[k]}" for k in keys)


def parse_selector(text: str) -> dict[str, str]:
    """'algorithm=diloco,inner_steps=30' -> {'algorithm': 'diloco', 'inner_steps': '30'}."""
    selector = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in part:
            raise ReportError(f"--baseline takes KEY=VALUE[,KEY=VALUE...], got '{part}'")
        key, value = part.split("=", 1)
        selector[key.strip()] = value.strip()
    return selector


def _matches(config: dict[str, Any], selector: dict[str, str]) -> bool:
    for key, wanted in selector.items():
        if key not in config:
            return False
        have = config[key]
        if isinstance(have, bool):
            if str(have).lower() != wanted.lower():
                return False
        elif isinstance(have, (int, float)):
            try:
                if float(wanted) != float(have):
                    return False
            except ValueError:
                return False
        elif str(have) != wanted:
            return False
    return True


def choose_baseline(rows: list[Row], selector: dict[str, str] | None) -> tuple[Row, str]:
    """The row ratios are taken against, and a sentence saying how it was chosen."""
    if selector:
        matching = [row for row in rows if _matches(row.config, selector)]
        wanted = ",".join(f"{k}={v}" for k, v in selector.items())
        if not matching:
            raise ReportError(f"no row matches --baseline {wanted}; rows: "
                              + "; ".join(row.label for row in rows))
        note = f"the row matching {wanted}"
        if len(matching) > 1:
            note += f" (the first of {len(matching)} that match)"
        return matching[0], note
    for row in rows:
        if row.config.get("algorithm") == "diloco" and not row.config.get("streaming"):
            return row, "the first DiLoCo row without streaming (choose another with --baseline KEY=VALUE)"
    return rows[0], "the first row: the sweep has no plain DiLoCo row (choose with --baseline KEY=VALUE)"


# --------------------------------------------------------------------------------------
# Writing


def markdown_table(rows: list[Row], baseline: Row) -> str:
    base_loss = baseline.stat("final_eval_loss").mean
    lines = ["| variant | seeds | eval loss | ratio to baseline | tokens | wall time (s) | CU | "
             "bytes up | bytes down | peak round / full sync |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        loss = row.stat("final_eval_loss")
        ratio = f"{loss.mean / base_loss:.4f}" if loss.mean is not None and base_loss else "-"
        tokens = row.stat("tokens")
        seeds = ", ".join(map(str, row.seeds)) + (f" (n={len(row.runs)})" if len(row.runs) > 1 else "")
        up, down = row.stat("bytes_up"), row.stat("bytes_down")
        lines.append(
            f"| {row.label}{' (baseline)' if row is baseline else ''} | {seeds} | {loss.format('.4f')} "
            f"| {ratio} | {'-' if tokens.mean is None else f'{tokens.mean:,.0f}'} "
            f"| {row.stat('wall_seconds').format('.1f')} | {row.stat('compute_utilization').format('.3f')} "
            f"| {'-' if up.mean is None else format_bytes(up.mean)} "
            f"| {'-' if down.mean is None else format_bytes(down.mean)} "
            f"| {row.stat('peak_round_share').format('.3f')} |")
    return "\n".join(lines)


def markdown_report(sweep_dir: Path, jobs: list[Job], rows: list[Row], baseline: Row | None, how: str) -> str:
    unfinished = [job for job in jobs if job.status != "completed"]
    done = len(jobs) - len(unfinished)
    parts = [
        f"# {'Run' if is_run_dir(Path(sweep_dir)) else 'Sweep'} report: {Path(sweep_dir).name}",
        "",
        f"{len(jobs)} jobs: {done} completed in {len(rows)} rows, "
        f"{sum(j.status == 'failed' for j in jobs)} failed, "
        f"{sum(j.status == 'interrupted' for j in jobs)} interrupted, "
        f"{sum(j.status == 'incomplete' for j in jobs)} incomplete.",
        "",
    ]
    if baseline is None:
        parts.append("(no completed run)")
    else:
        parts += [
            f"Every run: `{shared_settings(rows)}`.",
            "",
            "Eval loss: the final held-out cross-entropy (nats/token). Runs that differ only by "
            "seed share a row: mean ± sample standard deviation over the seeds (n runs). Ratio: the "
            f"row's mean eval loss over the baseline's; baseline: {how}, **{baseline.label}**. CU: "
            "compute utilization, the workers' seconds computing over their seconds computing or "
            "waiting. Bytes: the mean over seeds of what crossed the wire, summed over workers and "
            "rounds (down includes the θ(0) each worker receives once). Wall time: from the run's "
            "first evaluation to its end (corpus loading and worker start-up come before it).",
            "",
            markdown_table(rows, baseline),
        ]
    if unfinished:
        parts += ["", "## Jobs that did not complete", "", "| job | status | overrides | error |",
                  "|---|---|---|---|"]
        for job in unfinished:
            error = (job.error or "no summary.json yet: still running, or killed").splitlines()[0]
            parts.append(f"| {job.name} | {job.status} | {' '.join(job.overrides)} | "
                         f"{error.replace('|', '/')[:200]} |")
    return "\n".join(parts) + "\n"


def _mean_curve(runs: list[Job]) -> tuple[list[float], list[float], list[float]]:
    """Tokens, mean and std of eval loss at the evaluations every run of the row has."""
    by_run = [dict(run.eval_history) for run in runs]
    by_run = [h for h in by_run if h]
    if not by_run:
        return [], [], []
    tokens = sorted(set.intersection(*(set(h) for h in by_run)))
    stats = [Stat.of([h[t] for h in by_run]) for t in tokens]
    return tokens, [s.mean for s in stats], [s.std or 0.0 for s in stats]


def plot_loss_vs_tokens(rows: list[Row], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    finals = []
    for row in rows:
        tokens, mean, std = _mean_curve(row.runs)
        if not tokens:
            continue
        finals.append(mean[-1])
        n = len(row.runs)
        (line,) = ax.plot(tokens, mean, marker=".", label=f"{row.label} ({mean[-1]:.3f}"
                          + (f", n={n})" if n > 1 else ")"))
        if n > 1:
            ax.fill_between(tokens, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color=line.get_color(), alpha=0.2)
    if finals:
        # The first evaluation (an untrained model) dwarfs the differences that matter.
        top = ax.get_ylim()[1]
        ax.set_ylim(min(finals) - 0.3, min(top, max(finals) + 1.5))
    ax.set_xlabel("training tokens (all workers)")
    ax.set_ylabel("eval loss (nats/token)")
    ax.set_title(title + ("\nband: ± std over seeds" if any(len(r.runs) > 1 for r in rows) else ""),
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def loss_vs_inner_steps(rows: list[Row]) -> dict[str, list[tuple[int, Stat]]]:
    """{variant (all but H): [(H, final eval loss)] sorted by H}; {} when no variant ran at two
    or more H, since a plot of one dot per variant says nothing about H. Where every run makes
    the same inner steps (rounds × H), rounds follows H and is left out of the variant too."""
    configs = [row.config for row in rows]
    varying = varying_keys(configs)
    same_budget = len({c.get("rounds", 0) * c.get("inner_steps", 0) for c in configs}) == 1
    not_variant = ("inner_steps", "rounds") if same_budget else ("inner_steps",)
    lines: dict[str, list[tuple[int, Stat]]] = {}
    for row in rows:
        loss = row.stat("final_eval_loss")
        if loss.mean is not None:
            name = variant_label(row.config, varying, exclude=not_variant)
            lines.setdefault(name, []).append((row.config["inner_steps"], loss))
    lines = {name: sorted(points, key=lambda point: point[0]) for name, points in lines.items()}
    return lines if any(len(points) > 1 for points in lines.values()) else {}


def plot_loss_vs_inner_steps(rows: list[Row], path: Path, title: str) -> Path | None:
    """Final eval loss against H, one line per variant; None (and no file) when H was not swept."""
    lines = loss_vs_inner_steps(rows)
    if not lines:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in lines.items():
        ax.errorbar([h for h, _ in points], [s.mean for _, s in points],
                    yerr=[s.std or 0.0 for _, s in points], marker="o", capsize=3, label=name)
    all_h = sorted({row.config["inner_steps"] for row in rows})
    if all_h[-1] >= 5 * all_h[0]:  # e.g. H = 10, 30, 100: evenly apart on a log axis
        ax.set_xscale("log")
        ax.minorticks_off()
    ax.set_xticks(all_h, [str(h) for h in all_h])
    ax.set_xlabel("H (inner steps per outer step)")
    ax.set_ylabel("final eval loss (nats/token)")
    ax.set_title(title + ("\nbars: ± std over seeds" if any(len(r.runs) > 1 for r in rows) else ""),
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report(sweep_dir: Path, out_dir: Path | None = None, baseline: str = "") -> dict[str, Path]:
    """Write report.md and the two plots for `sweep_dir`; returns their paths."""
    sweep_dir = Path(sweep_dir)
    out_dir = Path(out_dir or sweep_dir)
    jobs = load_jobs(sweep_dir)
    rows = group_rows(jobs)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"report": out_dir / REPORT_NAME}
    if not rows:  # every job failed: the report lists why
        paths["report"].write_text(markdown_report(sweep_dir, jobs, [], None, ""))
        return paths
    base_row, how = choose_baseline(rows, parse_selector(baseline) if baseline else None)
    paths["report"].write_text(markdown_report(sweep_dir, jobs, rows, base_row, how))
    title = textwrap.fill(f"{sweep_dir.resolve().name}: {shared_settings(rows)}", 80)
    paths["eval_loss_vs_tokens"] = plot_loss_vs_tokens(rows, out_dir / TOKENS_PLOT_NAME, title)
    h_plot = plot_loss_vs_inner_steps(rows, out_dir / H_PLOT_NAME, title)
    if h_plot:
        paths["eval_loss_vs_H"] = h_plot
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fl-diloco report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path,
                        help="a sweep directory (fl-diloco train -m), or one run's out_dir")
    parser.add_argument("--baseline", default="",
                        help="KEY=VALUE[,KEY=VALUE...] picking the row ratios are taken against "
                             "(default: the first DiLoCo row without streaming)")
    parser.add_argument("--out", type=Path, help="where to write report.md and the plots "
                                                 "(default: the sweep directory)")
    args = parser.parse_args(argv)
    try:
        paths = report(args.sweep_dir, args.out, args.baseline)
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(paths["report"].read_text())
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0
