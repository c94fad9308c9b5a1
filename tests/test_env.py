"""Environments: Gymnasium's checker, rewards, episode resets and the surrogate's fit."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from airlora.config import EnvConfig, LinkConfig
from airlora.env import OBSERVATION_FIELDS, SyntheticRankEnv, projection_groups
from airlora.env.real import RankSelectionEnv
from airlora.env.reward import round_reward
from airlora.env.surrogate import (
    ROUNDS_FILE,
    SurrogateRejected,
    collect_rounds,
    fit_surrogate,
    read_rounds,
    write_rounds,
)


@pytest.fixture
def real_env(tiny_finetune_config):
    cfg = tiny_finetune_config
    link = LinkConfig(scheme="analog", snr_process="uniform", snr_low_db=0.0, snr_high_db=20.0)
    return RankSelectionEnv.build(cfg.data, cfg.model, cfg.train, link, EnvConfig(), seed=0)


def _payload_layout(env: RankSelectionEnv) -> tuple[list[int], int]:
    server = env.engine.server
    return [p.d_in + p.d_out for p in server.projections], server.payload().head_params


def test_real_env_passes_gymnasium_checker(real_env):
    check_env(real_env, skip_render_check=True)


def test_real_env_episode_reward_and_reset(real_env):
    obs, info = real_env.reset(seed=5)
    assert obs.shape == (len(OBSERVATION_FIELDS),) and obs.dtype == np.float32
    m = real_env.action_space.shape[0]
    rewards, infos = [], []
    done = False
    while not done:
        obs, reward, done, truncated, info = real_env.step(np.full(m, 2))
        rewards.append(reward)
        infos.append(info)
        assert not truncated
    assert len(rewards) == real_env.episode_rounds
    for reward, info in zip(rewards, infos, strict=True):
        metrics = info["metrics"]
        expected = (
            metrics["accuracy"] - 0.1 * metrics["payload_params"] / metrics["max_payload_params"]
        )
        assert reward == pytest.approx(expected)
        assert metrics["link"]["scheme"] == "analog"
    # A new episode starts from the fresh adapter: same seed, same first observation and reward.
    first = real_env.reset(seed=5)[0]
    again = real_env.step(np.full(m, 2))[1]
    assert np.array_equal(first, real_env.reset(seed=5)[0])
    assert real_env.step(np.full(m, 2))[1] == pytest.approx(again)


def test_complexity_in_the_state_describes_the_data_unless_asked():
    from airlora.data import ComplexityFeatures
    from airlora.env.observation import build_observation

    feats = ComplexityFeatures(0.5, 0.7, 0.4, 1.2, model_loss=1.2)
    loss_at = OBSERVATION_FIELDS.index("complexity_model_loss")
    plain = build_observation(10.0, feats, 1, 4, 0.5, None, 8, EnvConfig())
    assert plain[loss_at] == 0.0 and plain[loss_at - 4] == pytest.approx(0.5)
    shown = build_observation(10.0, feats, 1, 4, 0.5, None, 8, EnvConfig(model_loss_in_state=True))
    assert shown[loss_at] == pytest.approx(0.3)
    assert np.array_equal(np.delete(plain, loss_at), np.delete(shown, loss_at))


def test_gain_reward_form():
    cfg = EnvConfig(cost_weight=0.2, reward_form="gain")
    assert round_reward(0.8, 0.7, 50, 100, cfg) == pytest.approx(0.1 - 0.1)
    assert round_reward(0.8, 0.7, 50, 100, EnvConfig(cost_weight=0.2)) == pytest.approx(0.7)
    with pytest.raises(ValueError, match="previous accuracy"):
        round_reward(0.8, float("nan"), 50, 100, cfg)


def test_surrogate_fits_logged_rounds_and_passes_checker(real_env, tmp_path):
    rows = collect_rounds(real_env, episodes=4, seed=0)
    assert len(rows) == 4 * real_env.episode_rounds
    write_rounds(rows, tmp_path / ROUNDS_FILE)
    assert read_rounds(tmp_path / ROUNDS_FILE) == rows
    per_rank, head = _payload_layout(real_env)
    args = (
        rows,
        real_env.projection_names,
        real_env.r_max,
        per_rank,
        head,
        real_env.link_config,
        EnvConfig(),
    )
    env = fit_surrogate(*args, eval_rows=len(real_env.engine.task.edge_eval))
    fit = env.model.metrics
    # Every round of every episode is predicted once by a model that never saw its episode.
    assert fit["episodes"] == 4 and fit["held_out_rounds"] == len(rows)
    held = np.asarray([r.accuracy for r in rows])
    assert fit["loeo_mae"] >= 0 and np.isfinite(fit["loeo_r2"])
    assert 0 < fit["noise_floor_rmse"] < 0.5 and fit["noise_floor_r2"] <= 1.0
    # A surrogate that predicts 0 or 1 would be far worse than this.
    assert fit["loeo_mae"] < 2 * np.mean(np.abs(held - held.mean())) + 1e-9
    check_env(env, skip_render_check=True)
    # Payload bookkeeping agrees with the real model's.
    ranks = np.full(len(per_rank), 3)
    _, _, _, _, info = env.step(ranks)
    assert (
        info["payload_params"] == real_env.engine.server.payload([3] * len(per_rank)).total_params
    )
    with pytest.raises(SurrogateRejected, match=r"R\^2 .* < surrogate.min_r2 0.9999"):
        fit_surrogate(*args, min_r2=0.9999)


def test_read_rounds_names_the_bad_line(tmp_path):
    path = tmp_path / ROUNDS_FILE
    path.write_text('{"episode": 0}\n')
    with pytest.raises(ValueError, match="line 1"):
        read_rounds(path)


def test_synthetic_env_optimum_is_exact_and_snr_dependent():
    env = SyntheticRankEnv()
    check_env(env, skip_render_check=True)
    low, _ = env.optimum(-5.0, 0.9)
    high, best = env.optimum(25.0, 0.9)
    assert low.sum() < high.sum()
    rng = np.random.default_rng(0)
    for _ in range(200):  # no rank vector beats the enumerated optimum
        assert env.reward_of(rng.integers(0, 9, 24), 25.0, 0.9) <= best + 1e-12
    _obs, info = env.reset(seed=1)
    _, reward, _, _, _step_info = env.step(info["optimal_rank_vector"])
    assert reward == pytest.approx(info["optimal_reward"])


def _tiny_refinement_env() -> SyntheticRankEnv:
    # 4 layers x 2 types, r_max 2: 3^8 = 6,561 vectors, few enough to enumerate.
    return SyntheticRankEnv(
        num_layers=4, types=("query", "value"), r_max=2, deadline=True, depth_tilt=3.0
    )


def test_a_deadline_loses_the_tail_of_the_stream_and_still_charges_for_it():
    env = _tiny_refinement_env()
    units = env.capacity(10.0)
    assert 0 < units < env.num_projections * env.r_max
    assert env.capacity(25.0) == env.num_projections * env.r_max  # slot_share 1: all fits
    ranks = np.full(env.num_projections, env.r_max)
    arrived = env.delivered(ranks, 10.0)
    assert arrived.sum() == units // env.r_max and arrived[0] and not arrived[-1]
    u = env.utilities(10.0, 0.9)
    kept = np.where(arrived, u[np.arange(env.num_projections), ranks], 0.0)
    lost_cost = env.send_cost()[0, env.r_max] * (~arrived).sum()
    assert env.reward_of(ranks, 10.0, 0.9) == pytest.approx(kept.sum() - lost_cost)


def test_the_knapsack_optimum_and_the_group_ceiling_match_enumeration():
    env = _tiny_refinement_env()
    _, groups = projection_groups(env.projection_names, depth_bands=2)
    vectors = np.array(list(itertools.product(range(3), repeat=env.num_projections)))
    group_level = np.array(list(itertools.product(range(3), repeat=max(groups) + 1)))
    gaps = []
    for snr_db, difficulty in [(0.0, 1.0), (5.0, 0.75), (5.0, 1.0), (12.0, 0.9), (20.0, 1.0)]:
        rewards = [env.reward_of(v, snr_db, difficulty) for v in vectors]
        ranks, best = env.optimum(snr_db, difficulty)
        assert best == pytest.approx(max(rewards), abs=1e-12)
        assert env.reward_of(ranks, snr_db, difficulty) == pytest.approx(best, abs=1e-12)
        coarse = max(env.reward_of(v[groups], snr_db, difficulty) for v in group_level)
        lower, upper = env.coarse_ceiling(snr_db, difficulty, groups)
        assert lower <= coarse + 1e-12 and coarse <= upper + 1e-12
        gaps.append(best - coarse)
    assert max(gaps) > 0.01  # some rounds want different ranks within a group


def test_depth_importance_follows_the_data():
    env = SyntheticRankEnv(depth_tilt=2.0)
    easy, hard = env.importance_now(0.75), env.importance_now(1.0)
    assert easy[0] / easy[-1] > env.importance[0] / env.importance[-1]  # early layers gain
    assert hard[-1] / hard[0] > env.importance[-1] / env.importance[0]  # deep layers gain
    assert easy.sum() == pytest.approx(env.importance.sum()) == hard.sum()  # moved, not added
    assert np.array_equal(SyntheticRankEnv().importance_now(0.75), env.importance)
    with pytest.raises(ValueError, match="depth_tilt"):
        SyntheticRankEnv(depth_tilt=-1.0)


def test_the_benchmark_env_leaves_group_levels_short_of_the_threshold():
    from airlora.bench.convergence import THRESHOLD, coarse_headroom

    result = coarse_headroom(episodes=4)
    lower, upper = result["coarse_ceiling"]
    assert lower <= upper < THRESHOLD and result["headroom"] > 0.05


def test_projection_groups_by_type_and_depth_band():
    names = [
        f"bert.encoder.layer.{i}.attention.self.{t}" for i in range(4) for t in ("query", "key")
    ]
    groups, index = projection_groups(names)
    assert len(groups) == 2 and index == [0, 1] * 4
    groups, index = projection_groups(names, depth_bands=2)
    assert len(groups) == 4 and index == [0, 1, 0, 1, 2, 3, 2, 3]
    with pytest.raises(ValueError, match="depth_bands"):
        projection_groups(names, depth_bands=0)


def test_partial_nested_section_keeps_the_section_default():
    from airlora.config import PolicyTrainConfig

    config = PolicyTrainConfig.model_validate({"train": {"threads": 1}, "link": {"snr_low_db": 0}})
    assert config.train.rounds == 5 and config.train.threads == 1
    assert config.link.scheme == "digital" and config.link.deadline_s == 0.25
    assert config.link.snr_low_db == 0.0
