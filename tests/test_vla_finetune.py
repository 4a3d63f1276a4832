"""RL fine-tuning of the VLA through the CLI: PPO with ``flow_noise`` and ``flow_sde`` (ratio 1 at the first
minibatch, frozen backbone, checkpoints that rebuild the camera env), GRPO's shared initial states, resume, the
critic's input, and the rollout storage of image observations."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from distributed_launch import torchrun_finetune
from safetensors.torch import load_file

import robo_rlft.algos.grpo as grpo
import robo_rlft.algos.ppo as ppo
import robo_rlft.observations as observations
from envs import make_vector_env
from policies.checkpoint import load_policy
from policies.vla import VLAPolicy
from policies.vla_backbone import VLAObservation
from robo_rlft.checkpointing import latest_checkpoint
from robo_rlft.cli import main
from robo_rlft.config import GRPOConfig
from robo_rlft.observations import ObservationAdapter, stack_observations

TASK = ["env=tabletop", "env.task=LiftCube", "progress=false"]
CAMERAS = ["env.cameras=[agentview,wrist]", "env.image_size=32"]
# The tiny preset trains its VLM in SFT; these tests check RL on a frozen one (and LoRA added to it).
VLA = ["policy=vla_tiny", "policy.expert_width=32", "policy.expert_layers=1", "policy.denoising_steps=3"]
VLA += ["policy.freeze_backbone=true"]
ENV_ID = "robo_rlft/Tabletop-LiftCube-v0"
ENV_KWARGS = {"cameras": ["agentview", "wrist"], "image_size": 32}
# `robo-rlft finetune policy=vla` in a few seconds: 2 envs x 3 chunk steps, 2 minibatches, 2 epochs, 1 eval episode.
TINY_PPO = [
    "env.num_envs=2",
    "env.act_steps=8",
    "algo.steps_per_iteration=3",
    "algo.minibatch_size=3",
    "algo.update_epochs=2",
    "algo.critic_warmup_iterations=0",
    "algo.eval_episodes=1",
    "algo.target_kl=null",
    "algo.actor_lr=1e-3",
    "policy.critic.hidden_dims=[16]",
    "policy.noise.hidden_dims=[16]",
]
TINY_GRPO = [
    "algo=grpo",
    "env.num_envs=4",
    "env.act_steps=8",
    "algo.group_size=2",
    "algo.max_chunk_steps=2",
    "algo.minibatch_size=4",
    "algo.update_epochs=1",
    "algo.eval_episodes=1",
    "algo.dynamic_sampling=false",  # the tiny policy never succeeds: keep every group so the update runs
    "policy.noise.hidden_dims=[16]",
]


@pytest.fixture(autouse=True)
def _headless_rendering(monkeypatch):
    monkeypatch.setenv("MUJOCO_GL", "egl")


@pytest.fixture(scope="module")
def vla_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A VLA pretrained for 5 gradient steps on two LiftCube demonstrations with both cameras at 32 px."""
    root = tmp_path_factory.mktemp("vla_ft")
    collect = ["collect", "collect.episodes=2", "collect.action_noise=0", f"run_dir={root / 'data'}"]
    assert main([*collect, *TASK, *CAMERAS]) == 0
    pretrain = ["pretrain", f"pretrain.dataset={root / 'data' / 'dataset.npz'}", "pretrain.eval_episodes=0"]
    pretrain += ["pretrain.gradient_steps=5", "pretrain.batch_size=8", f"run_dir={root / 'sft'}"]
    assert main([*pretrain, *TASK, *CAMERAS, *VLA]) == 0
    return root / "sft" / "final"


def _finetune(run_dir: Path, checkpoint: Path, *extra: str) -> int:
    argv = ["finetune", f"run_dir={run_dir}", "policy=vla", f"policy.pretrained={checkpoint}", *TASK, *CAMERAS]
    return main([*argv, *extra])


def _rows(run_dir: Path) -> list[dict[str, str]]:
    """The training iterations' rows (row 0 is the evaluation of the pretrained policy)."""
    with open(run_dir / "metrics.csv", newline="") as f:
        return [row for row in csv.DictReader(f) if row["iteration"] != "0"]


@pytest.mark.parametrize("scheme", ["flow_noise", "flow_sde"])
def test_ppo_finetunes_the_vla_with_ratio_one_at_the_first_minibatch(tmp_path, vla_checkpoint, monkeypatch, scheme):
    # Rollout episodes of 16 steps (2 chunks), so the 3-step rollout bootstraps a truncation from info["final_obs"].
    make_vector_env_real, final_batches = observations.make_vector_env, []

    def short_episodes(*args, **kwargs):
        kwargs["env_kwargs"] = {**args[5], "max_episode_steps": 16}
        return make_vector_env_real(*args[:5], **kwargs)

    def stack_spy(items):
        final_batches.append(stack_observations(items))
        return final_batches[-1]

    monkeypatch.setattr(observations, "make_vector_env", short_episodes)
    monkeypatch.setattr(ppo, "stack_observations", stack_spy)
    run_dir = tmp_path / "run"
    assert _finetune(run_dir, vla_checkpoint, *TINY_PPO, "algo.iterations=1", f"policy.noise.scheme={scheme}") == 0
    (row,) = _rows(run_dir)
    assert int(float(row["episodes"])) == 2 and len(final_batches) == 1  # both envs truncated at step 2
    assert final_batches[0]["wrist_image"].shape == (2, 32, 32, 3) and final_batches[0]["state"].shape == (2, 8)
    assert abs(float(row["ratio_first_minibatch"]) - 1.0) < 1e-5, row
    assert float(row["approx_kl"]) > 0 and float(row["noise_std_mean"]) > 0  # later minibatches saw a moved policy
    assert int(float(row["skipped_updates"])) == 0
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["success_rate"] is not None and result["episodes"] == 1
    for name in ("best", "final"):
        policy, metadata = load_policy(run_dir / name, "vla")
        assert isinstance(policy, VLAPolicy) and policy.config.noise.scheme == scheme
        assert (
            metadata["env_kwargs"]["cameras"] == ["agentview", "wrist"] and metadata["env_kwargs"]["image_size"] == 32
        )
    # The expert (and the noise head) trained; the backbone is frozen by default.
    initial, final = load_file(vla_checkpoint / "model.safetensors"), load_file(run_dir / "final" / "model.safetensors")
    assert any(not torch.equal(initial[k], final[k]) for k in initial if k.startswith("expert."))
    assert all(torch.equal(initial[k], final[k]) for k in initial if k.startswith("backbone."))
    # The critic takes the pooled VLM prefix and the normalised state.
    critic = load_file(latest_checkpoint(run_dir) / "critic.safetensors")
    assert critic["net.0.weight"].shape[1] == policy.backbone.hidden_size + 8


def test_ppo_with_lora_trains_adapters_added_to_a_frozen_backbone_checkpoint(tmp_path, vla_checkpoint):
    run_dir = tmp_path / "run"
    assert _finetune(run_dir, vla_checkpoint, *TINY_PPO, "algo.iterations=1", "policy.lora_rank=2") == 0
    (row,) = _rows(run_dir)
    assert abs(float(row["ratio_first_minibatch"]) - 1.0) < 1e-5, row
    policy, _ = load_policy(run_dir / "final", "vla")
    assert policy.config.lora_rank == 2 and "lora_rank: 2" in (run_dir / "config.yaml").read_text()
    initial, final = load_file(vla_checkpoint / "model.safetensors"), load_file(run_dir / "final" / "model.safetensors")
    adapters = [k for k in final if "lora_B" in k]
    assert adapters and any(final[k].abs().sum() > 0 for k in adapters)  # B starts at zero: it trained
    for key in (k for k in initial if k.startswith("backbone.")):  # the VLM's own weights stay frozen
        module, _, name = key.rpartition(".")
        wrapped = f"{module}.base_layer.{name}"  # where LoRA moved an adapted layer's weight
        assert torch.equal(initial[key], final[key if key in final else wrapped]), key


@pytest.fixture(scope="module")
def vla_checkpoint_trained_vlm(tmp_path_factory: pytest.TempPathFactory, vla_checkpoint: Path) -> Path:
    """As ``vla_checkpoint``, but its SFT trained the VLM (``freeze_backbone=false``, the ``vla_tiny`` preset)."""
    root = tmp_path_factory.mktemp("vla_ft_unfrozen")
    pretrain = ["pretrain", f"pretrain.dataset={vla_checkpoint.parents[1] / 'data' / 'dataset.npz'}"]
    pretrain += ["pretrain.eval_episodes=0", "pretrain.gradient_steps=5", "pretrain.batch_size=8", f"run_dir={root}"]
    assert main([*pretrain, *TASK, *CAMERAS, *VLA[:-1], "policy.freeze_backbone=false"]) == 0
    assert load_policy(root / "final", "vla")[0].config.freeze_backbone is False
    return root / "final"


def test_freeze_backbone_is_a_finetuning_choice(tmp_path, vla_checkpoint_trained_vlm):
    checkpoint = vla_checkpoint_trained_vlm
    policy, _ = load_policy(checkpoint, "vla")
    assert all(p.requires_grad for p in policy.backbone.parameters())
    policy.configure_finetuning(dataclasses.replace(policy.config, freeze_backbone=True))
    assert policy.config.freeze_backbone and not any(p.requires_grad for p in policy.backbone.parameters())
    assert any(p.requires_grad for p in policy.expert.parameters())
    assert all(p.requires_grad for p in policy.noise.parameters())
    policy.configure_finetuning(dataclasses.replace(policy.config, freeze_backbone=False))
    assert all(p.requires_grad for p in policy.backbone.parameters())
    initial = load_file(checkpoint / "model.safetensors")
    # PPO from that checkpoint with policy.freeze_backbone=true: the VLM's weights do not move, the expert's do.
    frozen = tmp_path / "frozen"
    assert _finetune(frozen, checkpoint, *TINY_PPO, "algo.iterations=1", "policy.freeze_backbone=true") == 0
    (row,) = _rows(frozen)
    assert abs(float(row["ratio_first_minibatch"]) - 1.0) < 1e-5 and float(row["approx_kl"]) > 0, row
    final = load_file(frozen / "final" / "model.safetensors")
    assert any(not torch.equal(initial[k], final[k]) for k in initial if k.startswith("expert."))
    assert all(torch.equal(initial[k], final[k]) for k in initial if k.startswith("backbone."))
    assert load_policy(frozen / "final", "vla")[0].config.freeze_backbone is True
    assert "freeze_backbone: true" in (frozen / "config.yaml").read_text()
    # With policy.freeze_backbone=false the same run trains the VLM too.
    unfrozen = tmp_path / "unfrozen"
    assert _finetune(unfrozen, checkpoint, *TINY_PPO, "algo.iterations=1", "policy.freeze_backbone=false") == 0
    final = load_file(unfrozen / "final" / "model.safetensors")
    assert any(not torch.equal(initial[k], final[k]) for k in initial if k.startswith("backbone."))


def test_ppo_resume_of_a_vla_run_continues_exactly(tmp_path, vla_checkpoint):
    settings = [*TINY_PPO, "algo.checkpoint_every=1", "algo.eval_every=1", "algo.eval_episodes=1"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert _finetune(straight, vla_checkpoint, *settings, "algo.iterations=2") == 0
    assert _finetune(resumed, vla_checkpoint, *settings, "algo.iterations=1") == 0
    assert main(["finetune", f"resume={resumed}", "algo.iterations=2"]) == 0
    assert [r["iteration"] for r in _rows(resumed)] == ["1", "2"]
    a, b = load_file(straight / "final" / "model.safetensors"), load_file(resumed / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    _, metadata = load_policy(resumed / "final", "vla")
    assert metadata["env_kwargs"]["cameras"] == ["agentview", "wrist"]


def test_grpo_finetunes_the_vla_and_groups_share_their_initial_state(tmp_path, vla_checkpoint):
    run_dir = tmp_path / "run"
    assert _finetune(run_dir, vla_checkpoint, *TINY_GRPO, "algo.iterations=1", "policy.noise.scheme=flow_sde") == 0
    (row,) = _rows(run_dir)
    assert int(float(row["samples"])) > 0 and abs(float(row["ratio_first_minibatch"]) - 1.0) < 1e-5, row
    assert json.loads((run_dir / "eval.json").read_text())["success_rate"] is not None
    assert isinstance(load_policy(run_dir / "final", "vla")[0], VLAPolicy)

    policy, _ = load_policy(vla_checkpoint, "vla")
    adapter = ObservationAdapter.for_policy(policy)
    envs = make_vector_env(ENV_ID, 4, policy.horizon, 8, env_kwargs=ENV_KWARGS, flatten=adapter.flatten)
    try:
        torch.manual_seed(0)
        algo = GRPOConfig(group_size=2, max_chunk_steps=2)
        rollout = grpo.collect_group_rollouts(policy, envs, algo, grpo.group_seeds(0, 0, 2))
    finally:
        envs.close()
    first = rollout.obs[0]  # a VLAObservation of the 4 envs' first observations
    assert isinstance(first, VLAObservation) and first.instructions == ["lift the red cube"] * 4
    for g in range(2):
        assert torch.equal(first.state[2 * g], first.state[2 * g + 1]), f"group {g} members start differently"
        assert torch.equal(first.images["agentview"][2 * g], first.images["agentview"][2 * g + 1])
    assert not torch.equal(first.state[0], first.state[2]), "two groups start from the same state"
    assert rollout.obs[rollout.valid].batch_size == int(rollout.valid.sum())


@pytest.mark.slow
def test_ppo_under_torchrun_with_an_fsdp_sharded_vla_learner(tmp_path, vla_checkpoint):
    run_dir = tmp_path / "run"
    argv = [f"run_dir={run_dir}", "policy=vla", f"policy.pretrained={vla_checkpoint}", *TASK, *CAMERAS, *TINY_PPO]
    result = torchrun_finetune(*argv, "algo.iterations=1", "scale.num_workers=2", "scale.fsdp=true", "torch_threads=1")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (row,) = _rows(run_dir)
    assert abs(float(row["ratio_first_minibatch"]) - 1.0) < 1e-5 and float(row["approx_kl"]) > 0, row
    # The shards' update reached the saved policy; the frozen VLM stayed as it was.
    initial, final = load_file(vla_checkpoint / "model.safetensors"), load_file(run_dir / "final" / "model.safetensors")
    assert any(not torch.equal(initial[k], final[k]) for k in initial if k.startswith("expert."))
    assert all(torch.equal(initial[k], final[k]) for k in initial if k.startswith("backbone."))


def test_critic_input_is_the_pooled_prefix_or_expert_features_and_the_state(vla_checkpoint):
    policy, _ = load_policy(vla_checkpoint, "vla")
    envs = make_vector_env(ENV_ID, 2, policy.horizon, 8, env_kwargs=ENV_KWARGS, flatten=False)
    try:
        obs_np, _ = envs.reset(seed=0)
        for source, pooled in (("prefix", policy.backbone.hidden_size), ("expert", policy.config.expert_width)):
            adapter = ObservationAdapter.for_policy(policy, critic_input=source)
            obs = adapter(obs_np, adapter.instructions(envs), "cpu")
            assert adapter.critic_dim(policy) == pooled + policy.obs_dim == pooled + 8
            features = adapter.critic_features(policy, obs)
            assert features.shape == (2, pooled + 8) and not features.requires_grad
            torch.testing.assert_close(features[:, pooled:], policy.normalizer.normalize_obs(obs.state))
            # A batch's features do not depend on its other rows (the critic sees each observation alone).
            torch.testing.assert_close(adapter.critic_features(policy, obs[torch.tensor([1])]), features[1:])
            # Rollouts get them with the sample, from the same VLM forward.
            sample, with_sample = adapter.sample_with_critic_features(policy, obs)
            assert torch.equal(with_sample, features) and sample.chain.shape == (2, 4, policy.horizon, 7)
    finally:
        envs.close()
    assert main(["finetune", *TASK, *CAMERAS, "policy=vla", "policy.critic_input=pooled"]) == 2


def test_observation_buffer_stores_image_batches_and_rebuilds_any_rows(vla_checkpoint):
    policy, _ = load_policy(vla_checkpoint, "vla")
    adapter = ObservationAdapter.for_policy(policy)
    envs = make_vector_env(ENV_ID, 2, policy.horizon, 8, env_kwargs=ENV_KWARGS, flatten=False)
    try:
        buffer = adapter.new_buffer(3, 2, envs.single_observation_space)
        assert buffer.images["wrist"].shape == (3, 2, 32, 32, 3) and buffer.images["wrist"].dtype == torch.uint8
        stored = []
        obs_np, _ = envs.reset(seed=0)
        for t in range(3):
            stored.append(adapter(obs_np, [f"task {t} env {n}" for n in range(2)], "cpu"))
            buffer.store(t, stored[-1])
            obs_np, *_ = envs.step(np.zeros((2, policy.horizon, 7), np.float32))
    finally:
        envs.close()
    flat = buffer.flat()  # rows in (t, n) order
    assert flat.batch_size == 6 and flat.instructions[3] == "task 1 env 1"
    rows = torch.tensor([5, 0, 3])
    picked = flat[rows]
    for i, row in enumerate(rows.tolist()):
        t, n = divmod(row, 2)
        assert torch.equal(picked.state[i], stored[t].state[n])
        assert torch.equal(picked.images["agentview"][i], stored[t].images["agentview"][n])
        assert picked.instructions[i] == f"task {t} env {n}"
    mask = torch.zeros(3, 2, dtype=torch.bool)
    mask[1, 0] = mask[2, 1] = True
    masked = buffer[mask]
    assert masked.instructions == ["task 1 env 0", "task 2 env 1"] and torch.equal(masked.state, flat.state[[2, 5]])
    assert buffer.head(2).flat().batch_size == 4
    with pytest.raises(IndexError, match="one batch dimension"):
        buffer[:2]
    # Final observations of a Dict env (info["final_obs"] holds one dict per env) stack into one batch.
    batch = stack_observations(np.array([{"state": np.ones(8)}, {"state": np.zeros(8)}], dtype=object))
    assert batch["state"].shape == (2, 8) and batch["state"][0, 0] == 1
