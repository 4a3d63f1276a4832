"""MetricLogger: CSV layout, growing columns, resume truncation, TensorBoard events, plots."""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

import pytest

from robo_rlft.metrics import MetricLogger, csv_column, load_metrics


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def _row(iteration: int, **extra: float) -> dict[str, float]:
    env_steps = 100 * (iteration + 1)
    return {
        "iteration": iteration,
        "env_steps": env_steps,
        "rollout/return_mean": float(iteration),
        "train/approx_kl": 0.01,
        "time/sim": 0.5,
        **extra,
    }


def _log(metrics: MetricLogger, iteration: int, **extra: float) -> None:
    row = _row(iteration, **extra)
    metrics.log(int(row["env_steps"]), row)


def test_csv_column_rule() -> None:
    assert csv_column("iteration") == "iteration"
    assert csv_column("rollout/return_mean") == "return_mean"
    assert csv_column("train/approx_kl") == "approx_kl"
    assert csv_column("time/sim") == "time_sim"
    assert csv_column("eval/return_mean") == "eval_return_mean"
    assert csv_column("train/loss/actor") == "loss_actor"
    for bad in ("return_mean", "misc/x", "train/"):
        with pytest.raises(ValueError, match="namespace"):
            csv_column(bad)


def test_csv_columns_grow_when_eval_appears(tmp_path: Path) -> None:
    with MetricLogger(tmp_path, tensorboard=False) as metrics:
        _log(metrics, 0)
        _log(metrics, 1, **{"eval/return_mean": 5.0, "eval/return_ci95": 1.5})
        _log(metrics, 2)
        _log(metrics, 3, **{"train/entropy": math.nan})
    columns, rows = _read_csv(tmp_path / "metrics.csv")
    assert columns == [
        "iteration",
        "env_steps",
        "return_mean",
        "approx_kl",
        "time_sim",
        "eval_return_mean",
        "eval_return_ci95",
        "entropy",
    ]
    assert [r["iteration"] for r in rows] == ["0", "1", "2", "3"]
    assert rows[0]["eval_return_mean"] == "" and rows[2]["eval_return_mean"] == ""
    assert rows[1]["eval_return_mean"] == "5.0"
    assert rows[3]["entropy"] == "nan"
    assert rows[1]["env_steps"] == "200" and rows[1]["time_sim"] == "0.5"
    assert not (tmp_path / "metrics.csv.tmp").exists()


def test_log_validates_keys(tmp_path: Path) -> None:
    with MetricLogger(tmp_path, tensorboard=False) as metrics:
        with pytest.raises(ValueError, match="iteration"):
            metrics.log(0, {"rollout/return_mean": 1.0})
        with pytest.raises(ValueError, match="step=5"):
            metrics.log(5, {"iteration": 0, "env_steps": 100})
        with pytest.raises(ValueError, match="both map to CSV column 'entropy'"):
            metrics.log(0, {"iteration": 0, "rollout/entropy": 1.0, "train/entropy": 2.0})
        with pytest.raises(ValueError, match="scalar"):
            metrics.log(0, {"iteration": 0, "train/x": [1.0, 2.0]})
    with pytest.raises(RuntimeError, match="closed"):
        metrics.log(0, {"iteration": 0})


def test_fresh_logger_refuses_existing_run(tmp_path: Path) -> None:
    with MetricLogger(tmp_path, tensorboard=False) as metrics:
        _log(metrics, 0)
    with pytest.raises(FileExistsError, match="resume=True"):
        MetricLogger(tmp_path, tensorboard=False)
    with pytest.raises(ValueError, match="resume_iteration"):
        MetricLogger(tmp_path, tensorboard=False, resume=True)


def test_resume_drops_rows_after_checkpoint(tmp_path: Path) -> None:
    with MetricLogger(tmp_path, tensorboard=False) as metrics:
        for it in range(5):
            _log(metrics, it)
    with MetricLogger(tmp_path, tensorboard=False, resume=True, resume_iteration=2) as metrics:
        _, rows = _read_csv(tmp_path / "metrics.csv")
        assert [r["iteration"] for r in rows] == ["0", "1", "2"]
        _log(metrics, 3, **{"eval/return_mean": 9.0})
    columns, rows = _read_csv(tmp_path / "metrics.csv")
    assert [r["iteration"] for r in rows] == ["0", "1", "2", "3"]
    assert columns[-1] == "eval_return_mean"
    assert rows[3]["eval_return_mean"] == "9.0" and rows[0]["eval_return_mean"] == ""


def test_tensorboard_scalars_and_nan_skip(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with caplog.at_level(logging.WARNING, logger="robo_rlft.metrics"), MetricLogger(tmp_path) as metrics:
        _log(metrics, 0)
        _log(metrics, 1, **{"train/entropy": math.nan})
        _log(metrics, 2)
    assert any("train/entropy is nan" in r.getMessage() for r in caplog.records)
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"rollout/return_mean", "train/approx_kl", "time/sim"} <= set(tags)
    assert "iteration" not in tags and "train/entropy" not in tags
    events = acc.Scalars("rollout/return_mean")
    assert [e.step for e in events] == [100, 200, 300]
    assert [e.value for e in events] == pytest.approx([0.0, 1.0, 2.0])


def test_resume_purges_tensorboard_events_after_checkpoint(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricLogger(tmp_path) as metrics:
        for it in range(4):
            _log(metrics, it)
    with MetricLogger(tmp_path, resume=True, resume_iteration=1) as metrics:
        _log(metrics, 2)
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("rollout/return_mean")] == [100, 200, 300]


def test_plot_writes_png(tmp_path: Path) -> None:
    with MetricLogger(tmp_path, tensorboard=False) as metrics:
        for it in range(6):
            extra = {"eval/return_mean": it + 0.5, "eval/return_ci95": 0.3} if it % 2 else {}
            _log(metrics, it, **extra)
    out = metrics.plot(tmp_path / "plots" / "curve.png")  # plotting after close reads the CSV
    assert out.stat().st_size > 1000
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(KeyError, match="success_rate"):
        metrics.plot(tmp_path / "x.png", ys=["success_rate"])


def test_load_metrics_blanks_are_nan(tmp_path: Path) -> None:
    with MetricLogger(tmp_path, tensorboard=False) as metrics:
        _log(metrics, 0)
        _log(metrics, 1, **{"eval/return_mean": 2.0})
    data = load_metrics(tmp_path / "metrics.csv")
    assert data["env_steps"].tolist() == [100.0, 200.0]
    assert math.isnan(data["eval_return_mean"][0]) and data["eval_return_mean"][1] == 2.0
