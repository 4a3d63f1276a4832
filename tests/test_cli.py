"""The `robo-rlft` CLI: help, config errors, and a smoke run of every verb on tiny settings."""

from __future__ import annotations

import csv
import itertools
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from policies.checkpoint import load_policy
from robo_rlft.cli import VERBS, main
from robo_rlft.data import load_dataset

EVAL_KEYS = {"return_mean", "return_ci95", "success_rate", "success_ci95", "episodes", "episode_returns"}
METRIC_COLUMNS = {
    "iteration",
    "env_steps",
    "return_mean",
    "approx_kl",
    "clip_fraction",
    "noise_std_mean",
    "ratio_first_minibatch",
    "time_sim",
    "time_inference",
    "time_update",
}


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _check_eval_json(path: Path, episodes: int) -> dict:
    result = json.loads(path.read_text())
    assert result.keys() >= EVAL_KEYS
    assert result["episodes"] == episodes == len(result["episode_returns"])
    assert np.isfinite(result["return_mean"]) and result["return_ci95"] >= 0
    assert result["return_mean"] == pytest.approx(np.mean(result["episode_returns"]))
    assert result["success_rate"] is None  # hopper defines no success
    return result


# ---- help ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["--help"], ["-h"], []])
def test_help_lists_the_verbs_and_groups(capsys, argv):
    assert main(argv) == 0
    out = capsys.readouterr().out
    for verb in VERBS:
        assert verb in out
    assert "env=" in out and "hopper" in out and "walker2d" in out
    assert "policy=" in out and "flow" in out


def test_unknown_verb_returns_2_and_lists_the_verbs(capsys):
    assert main(["train"]) == 2
    err = capsys.readouterr().err
    assert "'train'" in err and all(verb in err for verb in VERBS)


def test_verb_help_prints_the_composed_config(capsys):
    assert main(["finetune", "--help", "algo.clip_coef=0.05", "env=walker2d"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("robo-rlft finetune:")
    assert "clip_coef: 0.05" in out  # the override is applied
    assert "name: walker2d" in out
    for section in ("env:", "policy:", "algo:", "collect:", "pretrain:", "eval:", "log_prob_reduction:"):
        assert section in out


# ---- config errors ------------------------------------------------------------------------------------

BAD_CONFIGS = [
    ("env=foo", ["foo", "env", "hopper", "walker2d", "humanoid"]),
    ("policy=transformer", ["transformer", "policy", "diffusion", "flow"]),
    ("algo=foo", ["foo", "algo", "ppo"]),
    ("algo.cliip=0.1", ["algo.cliip", "clip_coef", "gae_lambda", "target_kl"]),
    ("algo.log_prob_reduction=max", ["algo.log_prob_reduction", "'max'", "'sum'", "'mean'"]),
    ("env.act_steps=99", ["env.act_steps=99", "policy.horizon=4"]),
    ("foo=1", ["'foo'", "algo", "seed", "run_dir"]),
    ("algo.gamma=1.5", ["algo.gamma", "1.5", "[0, 1]"]),
    ("eval.episodes=0", ["eval.episodes", "0"]),
    ("device=tpu", ["device", "'tpu'", "cuda"]),
]


@pytest.mark.parametrize("verb", ["finetune", "eval"])
@pytest.mark.parametrize(("override", "expected"), BAD_CONFIGS, ids=[b[0] for b in BAD_CONFIGS])
def test_bad_config_returns_2_naming_key_and_allowed_values(capsys, tmp_path, verb, override, expected):
    run_dir = tmp_path / "run"
    assert main([verb, override, f"run_dir={run_dir}", "progress=false"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"robo-rlft {verb}: error:")
    for text in expected:
        assert text in err, (text, err)
    assert "Traceback" not in err
    assert not run_dir.exists(), "a bad config must be rejected before anything is written"


def test_unknown_key_hint_is_the_full_key(capsys):
    assert main(["finetune", "algo.cliip=0.1"]) == 2
    assert "Did you mean 'algo.clip_coef'?" in capsys.readouterr().err


def test_eval_of_a_missing_checkpoint_names_the_path(capsys, tmp_path):
    missing = tmp_path / "nonexistent"
    assert main(["eval", f"eval.checkpoint={missing}", f"run_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_eval_without_checkpoint_returns_2(capsys, tmp_path):
    assert main(["eval", f"run_dir={tmp_path / 'run'}"]) == 2
    assert "eval.checkpoint" in capsys.readouterr().err


def test_eval_of_an_unknown_builtin_checkpoint_names_it(capsys, tmp_path):
    assert main(["eval", "eval.checkpoint=builtin:no_such_policy", f"run_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert "'no_such_policy'" in err and "available" in err


def test_pretrain_without_dataset_returns_2(capsys, tmp_path):
    assert main(["pretrain", f"run_dir={tmp_path / 'run'}"]) == 2
    assert "pretrain.dataset" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_pretrain_with_a_missing_dataset_names_the_path(capsys, tmp_path):
    missing = tmp_path / "nope.npz"
    assert main(["pretrain", f"pretrain.dataset={missing}", f"run_dir={tmp_path / 'run'}"]) == 2
    assert str(missing) in capsys.readouterr().err


def test_finetune_with_a_missing_pretrained_checkpoint_names_the_path(capsys, tmp_path):
    missing = tmp_path / "no_policy"
    assert main(["finetune", f"policy.pretrained={missing}", f"run_dir={tmp_path / 'run'}", "progress=false"]) == 2
    assert str(missing) in capsys.readouterr().err


def test_resume_of_a_directory_that_is_not_a_run_returns_2(capsys, tmp_path):
    assert main(["finetune", f"resume={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "config.yaml" in err and str(tmp_path) in err


# ---- smoke runs of every verb -------------------------------------------------------------------------


def test_collect_pretrain_finetune_eval_chain(tmp_path, capsys):
    collect_dir, pretrain_dir, finetune_dir, eval_dir = (tmp_path / n for n in ("collect", "pre", "ft", "eval"))

    argv = ["collect", f"run_dir={collect_dir}", "collect.expert_steps=2048", "collect.episodes=2"]
    assert main([*argv, "collect.action_noise=0.1", "progress=false"]) == 0
    dataset = load_dataset(collect_dir / "dataset.npz")
    assert dataset.num_episodes == 2
    assert dataset.meta["env"] == "hopper" and dataset.meta["action_noise"] == 0.1
    assert (dataset.obs_dim, dataset.act_dim) == (11, 3)
    summary = json.loads((collect_dir / "collect.json").read_text())
    assert summary["episodes"] == 2 and summary["steps"] == dataset.num_steps
    assert (collect_dir / "expert" / "expert.zip").is_file()

    argv = ["pretrain", f"run_dir={pretrain_dir}", f"pretrain.dataset={collect_dir / 'dataset.npz'}"]
    argv += ["pretrain.gradient_steps=50", "pretrain.batch_size=64", "pretrain.eval_episodes=2"]
    assert main([*argv, "policy.hidden_dims=[32,32]", "policy.noise.hidden_dims=[16]", "progress=false"]) == 0
    config = json.loads((pretrain_dir / "final" / "config.json").read_text())
    assert config["policy_type"] == "flow" and config["config"]["hidden_dims"] == [32, 32]
    assert config["metadata"]["env"] == "hopper"
    policy, _ = load_policy(pretrain_dir / "final", "flow", 11, 3)
    stats = dataset.stats()  # the checkpoint carries the dataset's normaliser
    np.testing.assert_allclose(policy.normalizer.obs_mean.numpy(), stats["obs_mean"], rtol=1e-6)
    np.testing.assert_allclose(policy.normalizer.action_max.numpy(), stats["action_max"], rtol=1e-6)
    _check_eval_json(pretrain_dir / "eval.json", 2)

    argv = ["finetune", f"run_dir={finetune_dir}", f"policy.pretrained={pretrain_dir}", "algo.iterations=2"]
    argv += ["env.num_envs=2", "algo.steps_per_iteration=10", "algo.eval_episodes=2", "algo.minibatch_size=10"]
    assert main([*argv, "algo.update_epochs=2", "policy.critic.hidden_dims=[32,32]", "progress=false"]) == 0
    _check_finetune_run(finetune_dir, iterations=2, eval_episodes=2)

    argv = ["eval", f"run_dir={eval_dir}", f"eval.checkpoint={finetune_dir}", "eval.episodes=2", "progress=false"]
    assert main(argv) == 0
    result = _check_eval_json(eval_dir / "eval.json", 2)
    assert result["checkpoint"] in (str(finetune_dir / "best"), str(finetune_dir / "final"))
    assert "return" in capsys.readouterr().out


def _check_finetune_run(run_dir: Path, iterations: int, eval_episodes: int) -> None:
    assert json.loads((run_dir / "final" / "config.json").read_text())["metadata"]["iteration"] == iterations
    assert (run_dir / "best" / "config.json").is_file()
    pretrained, *rows = _read_csv(run_dir / "metrics.csv")
    assert int(pretrained["iteration"]) == 0 and pretrained["eval_return_mean"], "row 0 evaluates the start"
    assert rows[0].keys() >= METRIC_COLUMNS, sorted(rows[0])
    assert [int(r["iteration"]) for r in rows] == list(range(1, iterations + 1))
    env_steps = [int(r["env_steps"]) for r in rows]
    assert env_steps[0] > 0 and all(b > a for a, b in itertools.pairwise(env_steps))
    for row in rows:
        assert 0.05 <= float(row["noise_std_mean"]) <= 0.15
        assert float(row["time_sim"]) > 0 and float(row["time_inference"]) > 0 and float(row["time_update"]) > 0
    png = (run_dir / "learning_curve.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"iter_{iterations:06d}"
    _check_eval_json(run_dir / "eval.json", eval_episodes)


def test_finetune_and_eval_from_a_checkpoint(tmp_path, hopper_checkpoint, tiny_finetune):
    run_dir = tmp_path / "ft"
    argv = ["finetune", f"run_dir={run_dir}", f"policy.pretrained={hopper_checkpoint}", "algo.iterations=2"]
    assert main([*argv, *tiny_finetune]) == 0
    _check_finetune_run(run_dir, iterations=2, eval_episodes=2)
    saved = (run_dir / "config.yaml").read_text()
    assert "iterations: 2" in saved and "steps_per_iteration: 10" in saved

    eval_dir = tmp_path / "eval"
    assert main(["eval", f"run_dir={eval_dir}", f"eval.checkpoint={run_dir / 'final'}", "eval.episodes=3"]) == 0
    result = _check_eval_json(eval_dir / "eval.json", 3)
    assert result["env"] == "hopper" and result["checkpoint"] == str(run_dir / "final")


def test_eval_is_reproducible_for_a_seed(tmp_path, hopper_checkpoint):
    returns = []
    for name in ("a", "b"):
        argv = ["eval", f"run_dir={tmp_path / name}", f"eval.checkpoint={hopper_checkpoint}", "eval.episodes=3"]
        assert main([*argv, "seed=4", "progress=false"]) == 0
        returns.append(json.loads((tmp_path / name / "eval.json").read_text())["episode_returns"])
    assert returns[0] == returns[1]


def test_eval_video_writes_a_playable_mp4(tmp_path, hopper_checkpoint, monkeypatch):
    # Headless rendering through EGL (Debian: libegl1 + libegl-mesa0 (+ libgl1-mesa-dri for llvmpipe)).
    monkeypatch.setenv("MUJOCO_GL", "egl")
    import imageio.v2 as imageio

    run_dir = tmp_path / "eval"
    argv = ["eval", f"run_dir={run_dir}", f"eval.checkpoint={hopper_checkpoint}", "eval.episodes=2", "eval.video=true"]
    assert main([*argv, "progress=false"]) == 0
    result = _check_eval_json(run_dir / "eval.json", 2)
    video = run_dir / "video.mp4"
    assert result["video"] == str(video)
    assert video.stat().st_size > 1000
    frames = imageio.mimread(video, memtest=False)
    assert len(frames) >= 2
    assert frames[0].ndim == 3 and frames[0].shape[2] == 3
    assert np.ptp(np.asarray(frames[0])) > 0, "a blank frame means rendering failed"


def test_each_run_log_holds_only_its_own_run(tmp_path, hopper_checkpoint, caplog):
    # Under pytest the root logger already has handlers, so main()'s basicConfig(level=INFO) is a no-op.
    caplog.set_level(logging.INFO)
    for name in ("first", "second"):
        argv = ["eval", f"run_dir={tmp_path / name}", f"eval.checkpoint={hopper_checkpoint}", "eval.episodes=1"]
        assert main([*argv, "progress=false"]) == 0
    first_log = (tmp_path / "first" / "eval.log").read_text()
    assert str(tmp_path / "first") in first_log
    assert str(tmp_path / "second") not in first_log
