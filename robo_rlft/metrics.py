"""Training metrics: one `MetricLogger` writes `metrics.csv` and TensorBoard events side by side.

Keys are namespaced (`rollout/`, `train/`, `time/`, `eval/`) as in Stable-Baselines3, plus the two
index keys `iteration` and `env_steps`. TensorBoard gets the namespaced keys unchanged; the CSV
holds the same values flat, one row per `log` call, under these column names:

    iteration, env_steps     -> as-is, always the first two columns
    rollout/return_mean      -> return_mean        (`rollout/` and `train/`: namespace dropped)
    train/approx_kl          -> approx_kl
    time/sim                 -> time_sim           (`time/` and `eval/` keep it as a prefix,
    eval/return_mean         -> eval_return_mean    so eval and rollout values never collide)
    train/loss/actor         -> loss_actor         (any further "/" becomes "_")

Two keys that map to one column (e.g. `rollout/entropy` and `train/entropy`) raise ValueError.

Run directory layout:
    run_dir/metrics.csv
    run_dir/tb/events.out.tfevents.*
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

METRICS_CSV = "metrics.csv"
TB_DIR = "tb"
INDEX_COLUMNS = ("iteration", "env_steps")
NAMESPACES = ("rollout", "train", "time", "eval")
# Namespaces whose name is kept as a CSV column prefix (`time/sim` -> `time_sim`).
_PREFIXED_NAMESPACES = ("time", "eval")

_AXIS_LABELS = {
    "env_steps": "Environment steps",
    "iteration": "Iteration",
    "return_mean": "Rollout episode return (mean)",
    "eval_return_mean": "Eval episode return (mean)",
    "success_rate": "Success rate",
    "eval_success_rate": "Eval success rate",
    "ep_len_mean": "Episode length (mean)",
}


def csv_column(key: str) -> str:
    """CSV column name of a metric key (the rule is in the module docstring).

    Raises:
        ValueError: if the key is neither an index key nor in a known namespace.
    """
    if key in INDEX_COLUMNS:
        return key
    namespace, sep, name = key.partition("/")
    if not sep or namespace not in NAMESPACES or not name:
        raise ValueError(
            f"metric key {key!r} must be {' or '.join(map(repr, INDEX_COLUMNS))} or "
            f"'<namespace>/<name>' with namespace in {NAMESPACES}, e.g. 'train/approx_kl'"
        )
    flat = name.replace("/", "_")
    return f"{namespace}_{flat}" if namespace in _PREFIXED_NAMESPACES else flat


def _format_cell(value: float | int) -> str:
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return repr(float(value))  # shortest round-trip repr; nan -> 'nan', inf -> 'inf'


def load_metrics(csv_path: Path) -> dict[str, np.ndarray]:
    """Read a `metrics.csv` into one float64 array per column; blank cells become nan.

    Raises:
        FileNotFoundError: if the file does not exist.
    """
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        columns = list(reader.fieldnames or [])
        rows = list(reader)
    return {c: np.array([float(r[c]) if r.get(c) else math.nan for r in rows]) for c in columns}


def _pretty(column: str) -> str:
    return _AXIS_LABELS.get(column, column.replace("_", " ").capitalize())


class MetricLogger:
    """Writes each `log` call as one CSV row (flushed at once) and as TensorBoard scalars.

    The CSV header grows when a later call brings new columns (e.g. eval metrics, which appear
    only on eval iterations): the file is then rewritten atomically with the union of columns,
    blank where a row has no value. Otherwise rows are appended.

    Args:
        run_dir: run directory; created if missing.
        tensorboard: also write TensorBoard events under `run_dir/tb`.
        resume: continue the run already in `run_dir`, keeping its rows with
            `iteration <= resume_iteration` and dropping later ones (written after the last
            checkpoint, they would be duplicated). TensorBoard scalars past that point are
            hidden too (a `purge_step` from the last kept row's `env_steps`).
        resume_iteration: the checkpoint's iteration; required when `resume=True`.

    Raises:
        ValueError: `resume=True` without `resume_iteration` (or the reverse), or a negative one.
        FileExistsError: `resume=False` but `run_dir` already holds metrics; pick a new run_dir
            or pass `resume=True`.

    Example:
        with MetricLogger(run_dir) as metrics:
            metrics.log(env_steps, {"iteration": it, "env_steps": env_steps,
                                    "rollout/return_mean": ret, "train/approx_kl": kl})
        metrics.plot(run_dir / "learning_curve.png")
    """

    def __init__(
        self,
        run_dir: Path,
        tensorboard: bool = True,
        resume: bool = False,
        resume_iteration: int | None = None,
    ) -> None:
        if resume and resume_iteration is None:
            raise ValueError(
                "MetricLogger(resume=True) needs resume_iteration=<the checkpoint's iteration>, "
                "so that rows logged after that checkpoint can be dropped"
            )
        if not resume and resume_iteration is not None:
            raise ValueError(
                f"MetricLogger got resume_iteration={resume_iteration} with resume=False; "
                "pass resume=True to continue a run"
            )
        if resume_iteration is not None and resume_iteration < 0:
            raise ValueError(f"MetricLogger: resume_iteration must be >= 0, got {resume_iteration}")

        self.run_dir = Path(run_dir)
        self.csv_path = self.run_dir / METRICS_CSV
        self.tb_dir = self.run_dir / TB_DIR
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._columns: list[str] = []
        self._column_keys: dict[str, str] = {}  # CSV column -> metric key seen this session
        self._closed = False

        purge_step: int | None = None
        if resume_iteration is not None:  # i.e. resume=True, checked above
            purge_step = self._truncate_for_resume(resume_iteration)
        else:
            has_tb_events = self.tb_dir.is_dir() and any(self.tb_dir.glob("events.out.tfevents.*"))
            if self.csv_path.exists() or has_tb_events:
                raise FileExistsError(
                    f"{self.run_dir} already holds metrics ({METRICS_CSV} or {TB_DIR}/ events); "
                    "use a new run_dir, or pass resume=True, resume_iteration=<checkpoint iteration>"
                )

        self._file = open(self.csv_path, "a", newline="")  # noqa: SIM115 - closed in close()
        self._writer: Any = None
        if tensorboard:
            # Imported here: torch's TensorBoard writer is only needed by runs that ask for it.
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.tb_dir), purge_step=purge_step)

    # ------------------------------------------------------------------ resume
    def _truncate_for_resume(self, resume_iteration: int) -> int | None:
        """Drop CSV rows with iteration > resume_iteration; return TensorBoard's purge step."""
        if not self.csv_path.exists():
            logger.warning("resume: no %s in %s; starting a fresh metrics file", METRICS_CSV, self.run_dir)
            return None
        with open(self.csv_path, newline="") as f:
            reader = csv.DictReader(f)
            columns = list(reader.fieldnames or [])
            rows = list(reader)
        if rows and "iteration" not in columns:
            raise ValueError(f"resume: {self.csv_path} has no 'iteration' column (columns: {columns})")
        kept = []
        for line, row in enumerate(rows, start=2):
            try:
                iteration = int(row["iteration"])
            except (TypeError, ValueError) as e:
                raise ValueError(
                    f"resume: {self.csv_path} line {line} has iteration={row['iteration']!r}, not an int"
                ) from e
            if iteration <= resume_iteration:
                kept.append(row)
        dropped = len(rows) - len(kept)
        if dropped:
            logger.info("resume: dropped %d metric row(s) logged after iteration %d", dropped, resume_iteration)
        self._columns = columns
        self._rewrite(kept)
        # TensorBoard hides events with step >= purge_step from earlier event files. This
        # assumes the documented convention step == env_steps; with no kept rows, hide all.
        if not kept:
            return 0
        kept_steps = [int(row["env_steps"]) for row in kept if row.get("env_steps")]
        if not kept_steps:
            logger.warning("resume: no env_steps in %s, so old TensorBoard events are not purged", self.csv_path)
            return None
        return max(kept_steps) + 1

    def _rewrite(self, rows: list[dict[str, str]]) -> None:
        """Write the whole CSV (header = self._columns) to a temp file and rename it into place."""
        tmp = self.csv_path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            if self._columns:  # no columns yet: an empty file, as a fresh logger leaves it
                writer = csv.DictWriter(f, fieldnames=self._columns, restval="", lineterminator="\n")
                writer.writeheader()
                writer.writerows(rows)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.csv_path)  # atomic: a crash leaves the old or the new file, never half

    # ------------------------------------------------------------------ logging
    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Write one row of metrics.

        Call once per iteration with everything from that iteration (eval results included):
        each call is one CSV row.

        Args:
            step: TensorBoard global step. Pass `env_steps` (the SB3 convention); when
                `metrics` holds `env_steps`, the two must be equal (resume relies on it).
            metrics: `iteration` (required), `env_steps`, and namespaced scalars such as
                "rollout/return_mean"; values are Python/numpy numbers or 1-element tensors.
                NaN is written as `nan` in the CSV and skipped in TensorBoard, with a warning.

        Raises:
            ValueError: missing `iteration`, a key outside the namespaces, two keys for one CSV
                column, step != env_steps, or a non-scalar value.
            RuntimeError: if the logger is closed.
        """
        if self._closed:
            raise RuntimeError(f"MetricLogger for {self.run_dir} is closed; create a new one to log")
        if "iteration" not in metrics:
            raise ValueError(
                f"MetricLogger.log needs an 'iteration' entry in metrics (resume truncates by it); "
                f"got keys {sorted(metrics)}"
            )
        if "env_steps" in metrics and float(metrics["env_steps"]) != step:
            raise ValueError(
                f"MetricLogger.log: step={step} but metrics['env_steps']={metrics['env_steps']}; "
                "pass step=env_steps so TensorBoard and the CSV share one x-axis"
            )

        row: dict[str, str] = {}
        values: dict[str, float] = {}
        for key, raw in metrics.items():
            column = csv_column(key)
            previous = self._column_keys.setdefault(column, key)
            if previous != key:
                raise ValueError(f"metric keys {previous!r} and {key!r} both map to CSV column {column!r}; rename one")
            try:
                value = float(raw)
            except (TypeError, ValueError) as e:
                raise ValueError(f"metric {key!r} must be a scalar number, got {raw!r}") from e
            if key in INDEX_COLUMNS and not value.is_integer():
                raise ValueError(f"metric {key!r} must be a whole number, got {raw!r}")
            row[column] = _format_cell(int(value) if key in INDEX_COLUMNS else value)
            values[key] = value

        new_columns = [c for c in row if c not in self._columns]
        if new_columns:
            self._add_columns(new_columns)
        csv.DictWriter(self._file, fieldnames=self._columns, restval="", lineterminator="\n").writerow(row)
        self._file.flush()

        if self._writer is not None:
            for key, value in values.items():
                if key in INDEX_COLUMNS:
                    continue  # the x-axis itself; not a curve
                if math.isnan(value):
                    logger.warning("metric %s is nan at step %d; skipped in TensorBoard", key, step)
                    continue
                self._writer.add_scalar(key, value, global_step=step)
            self._writer.flush()

    def _add_columns(self, new_columns: list[str]) -> None:
        """Grow the header: index columns first, then columns in order of first appearance."""
        self._file.close()
        rows: list[dict[str, str]] = []
        if self.csv_path.stat().st_size > 0:
            with open(self.csv_path, newline="") as f:
                rows = list(csv.DictReader(f))
        merged = self._columns + new_columns
        index_columns = [c for c in INDEX_COLUMNS if c in merged]
        self._columns = index_columns + [c for c in merged if c not in INDEX_COLUMNS]
        self._rewrite(rows)
        self._file = open(self.csv_path, "a", newline="")  # noqa: SIM115 - closed in close()

    # ------------------------------------------------------------------ plotting
    def plot(self, path: Path, x: str = "env_steps", ys: Sequence[str] = ("return_mean",)) -> Path:
        """Learning-curve PNG from `metrics.csv`.

        For each column `y` in `ys` a line is drawn; if the CSV also holds `eval_<y>` (e.g.
        `eval_return_mean`) those points are drawn as markers, with a shaded band of
        ± `eval_<base>_ci95` where `<base>` is `y` without a trailing `_mean`
        (e.g. `eval_return_ci95`).

        Args:
            path: output PNG path; parent directories are created.
            x: column for the x-axis.
            ys: columns to draw.

        Returns:
            `path`.

        Raises:
            KeyError: if `x` or one of `ys` is not a CSV column (the message lists them).
        """
        # Figure + Agg canvas directly: no pyplot global state and no display needed.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        if not self._closed:
            self._file.flush()
        data = load_metrics(self.csv_path)
        missing = [c for c in (x, *ys) if c not in data]
        if missing:
            raise KeyError(f"plot: column(s) {missing} not in {self.csv_path}; columns: {list(data)}")

        fig = Figure(figsize=(7, 4.5), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        xs = data[x]
        for i, y in enumerate(ys):
            color = f"C{i}"
            ok = ~np.isnan(xs) & ~np.isnan(data[y])
            ax.plot(xs[ok], data[y][ok], color=color, label=_pretty(y))
            eval_col = f"eval_{y}"
            if eval_col == y or eval_col not in data:
                continue
            ok_eval = ~np.isnan(xs) & ~np.isnan(data[eval_col])
            ax.plot(xs[ok_eval], data[eval_col][ok_eval], "o", color=color, markersize=5, label=_pretty(eval_col))
            ci_col = f"eval_{y.removesuffix('_mean')}_ci95"
            if ci_col in data:
                ok_ci = ok_eval & ~np.isnan(data[ci_col])
                mean, half = data[eval_col][ok_ci], data[ci_col][ok_ci]
                ax.fill_between(xs[ok_ci], mean - half, mean + half, color=color, alpha=0.2, label="Eval 95 % CI")
        ax.set_xlabel(_pretty(x))
        ax.set_ylabel(_pretty(ys[0]) if len(ys) == 1 else "Value")
        ax.set_title(f"Learning curve — {self.run_dir.name}")
        ax.grid(alpha=0.3)
        ax.legend(loc="best")

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        logger.info("wrote learning curve %s", path)
        return path

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Flush and close the CSV and TensorBoard files; calling it again does nothing."""
        if self._closed:
            return
        self._closed = True
        self._file.close()
        if self._writer is not None:
            self._writer.close()

    def __enter__(self) -> MetricLogger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
