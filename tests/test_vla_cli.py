"""The VLA through the CLI: collect with cameras -> pretrain policy=vla_tiny -> eval rebuilds the camera env;
the camera and dataset errors; the observation adapter that feeds state and image policies. RL fine-tuning of
the VLA: tests/test_vla_finetune.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from envs import make_env, make_vector_env
from policies.vla_backbone import VLAObservation
from robo_rlft.cli import main
from robo_rlft.data import DemoDataset
from robo_rlft.observations import ObservationAdapter, add_batch_dim

TASK = ["env=tabletop", "env.task=LiftCube", "progress=false"]
CAMERAS = ["env.cameras=[agentview,wrist]", "env.image_size=32"]
VLA = ["policy=vla_tiny", "policy.expert_width=32", "policy.expert_layers=1"]
TINY_SFT = ["pretrain.gradient_steps=5", "pretrain.batch_size=8"]


@pytest.fixture(autouse=True)
def _headless_rendering(monkeypatch):
    monkeypatch.setenv("MUJOCO_GL", "egl")


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two-episode LiftCube datasets: with both cameras at 32 px, and with the agentview camera only."""
    root = tmp_path_factory.mktemp("vla_data")
    runs = {"both": CAMERAS, "agentview": ["env.cameras=[agentview]", "env.image_size=32"]}
    for name, cameras in runs.items():
        argv = ["collect", "collect.episodes=2", "collect.action_noise=0", f"run_dir={root / name}", *TASK, *cameras]
        assert main(argv) == 0
    return {name: root / name / "dataset.npz" for name in runs}


def test_collect_pretrain_eval_end_to_end(tmp_path, datasets):
    pretrain = ["pretrain", f"pretrain.dataset={datasets['both']}", "pretrain.eval_episodes=1", *TINY_SFT]
    # With the auxiliary object loss (and a trained VLM): its head trains but is not part of the checkpoint.
    aux = ["policy.object_loss_weight=1.0", "policy.freeze_backbone=false"]
    assert main([*pretrain, f"run_dir={tmp_path / 'p'}", *TASK, *CAMERAS, *VLA, *aux]) == 0
    assert not any(key.startswith("object_head") for key in load_file(tmp_path / "p" / "final" / "model.safetensors"))
    checkpoint = json.loads((tmp_path / "p" / "final" / "config.json").read_text())
    assert checkpoint["policy_type"] == "vla" and checkpoint["obs_dim"] == 8  # the state, not [state, object_state]
    assert checkpoint["config"]["expert_width"] == 32 and checkpoint["config"]["vlm_path"] == "tiny"
    assert checkpoint["metadata"]["env_kwargs"]["cameras"] == ["agentview", "wrist"]
    assert checkpoint["metadata"]["env_kwargs"]["image_size"] == 32
    assert (tmp_path / "p" / "final" / "vlm" / "config.json").is_file()  # the checkpoint carries its VLM
    assert json.loads((tmp_path / "p" / "eval.json").read_text())["success_rate"] is not None
    # No env options on this command line: the checkpoint's env, cameras included, is rebuilt.
    evaluate = ["eval", f"eval.checkpoint={tmp_path / 'p'}", "eval.episodes=2", "eval.num_envs=2", "eval.video=true"]
    assert main([*evaluate, f"run_dir={tmp_path / 'e'}", "progress=false"]) == 0
    result = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert result["env"] == "robo_rlft/Tabletop-LiftCube-v0" and result["episodes"] == 2
    assert 0.0 <= result["success_rate"] <= 1.0 and len(result["success_ci95"]) == 2
    assert (tmp_path / "e" / "video.mp4").stat().st_size > 0


@pytest.mark.parametrize(
    ("cameras", "lacks"),
    [([], "env.cameras=[] lacks ['agentview', 'wrist']"), (["env.cameras=[wrist]"], "lacks ['agentview']")],
)
def test_policy_vla_needs_the_env_to_render_its_cameras(capsys, cameras, lacks):
    assert main(["pretrain", *TASK, *VLA, *cameras]) == 2
    err = capsys.readouterr().err
    assert "policy.cameras=['agentview', 'wrist']" in err and lacks in err


def test_pretrain_refuses_a_dataset_without_the_policys_images(tmp_path, capsys, datasets):
    argv = ["pretrain", f"pretrain.dataset={datasets['agentview']}", f"run_dir={tmp_path}", *TASK, *CAMERAS, *VLA]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "no images of cameras ['wrist'] (it has ['agentview'])" in err
    assert "env.cameras=[agentview,wrist]" in err  # how to record them
    assert not (tmp_path / "config.yaml").exists()  # refused before the run started
    argv = ["pretrain", f"pretrain.dataset={datasets['both']}", *TASK, *VLA, "env.cameras=[agentview,wrist]"]
    assert main(argv) == 2  # the env would render 128 px, the images are 32 px
    assert "env.image_size=128" in capsys.readouterr().err


def test_observation_adapter_feeds_state_and_image_policies(flow_policy_factory):
    state = ObservationAdapter.for_policy(flow_policy_factory())
    assert (state.kind, state.flatten, state.uses_images) == ("state", True, False)
    flat = np.arange(6, dtype=np.float64).reshape(2, 3)
    assert torch.equal(state(flat, state.instructions(None), "cpu"), torch.as_tensor(flat, dtype=torch.float32))

    from policies.vla import VLAPolicy, VLAPolicyConfig

    vla = ObservationAdapter.for_policy(VLAPolicy, VLAPolicyConfig(vlm_path="tiny", cameras=["wrist", "agentview"]))
    assert (vla.kind, vla.cameras, vla.flatten) == ("vla", ("wrist", "agentview"), False)
    kwargs = {"cameras": ["agentview", "wrist"], "image_size": 32}
    envs = make_vector_env("robo_rlft/Tabletop-LiftCube-v0", 2, 4, 4, env_kwargs=kwargs, flatten=vla.flatten)
    try:
        obs, _ = envs.reset(seed=0)
        batch = vla(obs, vla.instructions(envs), "cpu")
        assert vla.obs_dim(envs.single_observation_space) == 8
    finally:
        envs.close()
    assert isinstance(batch, VLAObservation) and batch.instructions == ["lift the red cube"] * 2
    assert list(batch.images) == ["wrist", "agentview"] and batch.images["wrist"].shape == (2, 32, 32, 3)
    assert torch.equal(batch.state, torch.as_tensor(obs["state"], dtype=torch.float32))
    env = make_env("robo_rlft/Tabletop-LiftCube-v0", flatten=False, **kwargs)  # one env: a batch of one
    single = vla(add_batch_dim(env.reset(seed=0)[0]), vla.instructions(env), "cpu")
    env.close()
    assert single.batch_size == 1 and torch.equal(single.state, batch.state[:1])

    # A dataset's steps: the state dims of the flat observation, the images, the instructions.
    n = 3
    layout = {"state": 2, "object_state": 1}
    observations = np.array([[1, 2, 10], [3, 4, 20], [5, 6, 30]], np.float32)
    frames = np.zeros((n, 8, 8, 3), np.uint8)
    dataset = DemoDataset(
        observations, np.zeros((n, 1), np.float32), np.zeros(n, np.float32), np.array([False, False, True]),
        np.zeros(n, bool), meta={"observation_layout": layout}, images={"agentview": frames, "wrist": frames + 1},
        instructions=np.full(n, "lift"),
    )  # fmt: skip
    inputs, stats = vla.dataset_inputs(dataset)
    assert torch.equal(inputs.state, torch.as_tensor(observations[:, :2])) and inputs.instructions == ["lift"] * 3
    assert inputs[torch.tensor([2])].images["wrist"].shape == (1, 8, 8, 3)
    np.testing.assert_allclose(stats["obs_mean"], [3, 4])
    assert stats["obs_std"].shape == (2,) and stats["action_min"].shape == (1,)
    # The other dims (the objects' poses), z-scored over the dataset: the target of policy.object_loss_weight.
    torch.testing.assert_close(inputs.object_state, torch.tensor([[-1.0], [0.0], [1.0]]) * (1.5**0.5))
    assert inputs[torch.tensor([0, 2])].object_state.shape == (2, 1)
    inputs, stats = state.dataset_inputs(dataset)  # a state policy: the whole flat observation, as before
    assert torch.equal(inputs, torch.as_tensor(observations)) and stats["obs_mean"].shape == (3,)
