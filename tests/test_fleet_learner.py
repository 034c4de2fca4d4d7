"""The fleet's learner: killed with -9 it resumes from orbax with the same replay (and the same next
round as a learner that never died), and a planted bad policy is stopped by the gate.

The learners run as real processes on a tiny debug prior and a store of random schema-valid episodes;
their gate is the real simulated one (the C twin) over one held-out episode.
"""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import REPO_ROOT
from conftest import write_tiny_prior
from conftest import write_tiny_state_pro

import configs
from jaxvla import episodes as E
from jaxvla.actor import policy as actor_policy
from learner.fleet import gate as gates
from learner.fleet.loop import FleetLearner
from learner.fleet.store import EpisodeStore

LEARNER_ARGS = [
    "--fleet.offline-data",
    "",
    "--fleet.episodes-per-round",
    "8",
    "--fleet.ingest-episodes",
    "4",
    "--fleet.rounds",
    "2",
    "--fleet.gate-episodes",
    "1",
    "--fleet.poll-s",
    "0.2",
    "--patch.updates-per-round",
    "2",
    "--patch.capacity",
    "256",
    "1024",
    "256",
    "--sac.batch-size",
    "16",
    "--sac.utd",
    "2",
    "--sac.critic-warmup",
    "2",
]


@pytest.fixture(scope="module")
def fleet_root(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("fleet-learner")
    write_tiny_prior(root / "prior")
    store = EpisodeStore(root / "store")
    rng = np.random.default_rng(0)
    for _ in range(16):
        store.commit(E.random_episode(rng, int(rng.integers(20, 40))))
    return root


def learner_process(root: pathlib.Path, prior: pathlib.Path) -> subprocess.Popen:
    args = ["debug", "--target.prior", str(prior), "--fleet.root", str(root), *LEARNER_ARGS]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.Popen(
        [sys.executable, "-m", "tools.fleet_learner", *args],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def log(root: pathlib.Path) -> list[dict]:
    path = root / "learner" / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def rounds(root: pathlib.Path) -> dict[int, dict]:
    return {r["round"]: r for r in log(root) if r["event"] == "round"}


@pytest.mark.slow
def test_a_learner_killed_mid_run_resumes_with_the_same_replay(fleet_root, tmp_path):
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    for root in (killed, straight):
        shutil.copytree(fleet_root / "store", root / "store")
    reference = learner_process(straight, fleet_root / "prior")  # runs beside the killed one
    first = learner_process(killed, fleet_root / "prior")
    deadline = time.monotonic() + 300
    while 1 not in rounds(killed) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert 1 in rounds(killed), first.stderr.read().decode()[-2000:]
    first.send_signal(signal.SIGKILL)  # in round 2's ingestion or updates
    first.wait()
    second = learner_process(killed, fleet_root / "prior")
    assert second.wait(timeout=300) == 0, second.stderr.read().decode()[-2000:]
    assert reference.wait(timeout=300) == 0, reference.stderr.read().decode()[-2000:]

    resumed = [r for r in log(killed) if r["event"] == "resumed"]
    assert (
        resumed and resumed[-1]["round"] == 1 and resumed[-1]["replay_digest"] == resumed[-1]["saved_digest"]
    )
    for key in ("replay_digest", "params_digest", "cursor", "published"):
        assert rounds(killed)[2][key] == rounds(straight)[2][key], key
    assert rounds(killed)[2]["cursor"] == 15  # every stored episode ingested exactly once


def test_a_planted_bad_policy_is_stopped_by_the_gate(fleet_root, tmp_path):
    """The gate's evaluation here: on held-out observations, how often the candidate's action signs agree
    with the published policy's (a behavioural regression check; cheap, no simulation)."""
    obs = {
        k: np.asarray(v)
        for k, v in configs.get_config("debug").model.fake_observation(jax.random.key(3), 64).items()
    }

    def agreement(data: bytes) -> float:
        reference = actor_policy.loads(learner.registry.read(0)).infer(obs)["actions"]
        return float(np.mean(np.sign(actor_policy.loads(data).infer(obs)["actions"]) == np.sign(reference)))

    base = configs.get_config("debug")
    fleet_config = configs.FleetConfig(root=str(tmp_path), offline_data="", gate_margin=0.1)
    target = configs.TargetConfig(prior=str(fleet_root / "prior"))
    config = configs.dataclasses.replace(base, fleet=fleet_config, target=target)
    learner = FleetLearner(config, evaluation=agreement)
    params = learner.prior.params
    key = jax.random.key(1)
    bad = jax.tree.map(lambda x: x + 3.0 * jax.random.normal(key, x.shape), params)
    good = jax.tree.map(lambda x: x + 1e-4 * jax.random.normal(key, x.shape), params)

    planted = learner.propose(bad, 1)
    assert not planted["gate"]["passed"] and planted["published"] is None
    assert planted["gate"]["candidate"] < planted["gate"]["current"] - 0.1
    assert learner.registry.latest()["version"] == 0  # robots keep pulling version 0
    assert (tmp_path / "candidates" / "policy-v000001.msgpack").exists()  # kept for inspection

    fine = learner.propose(good, 2)
    assert fine["gate"]["passed"] and fine["published"] == 2
    latest = learner.registry.latest()
    assert latest["version"] == 2 and latest["parent_version"] == 0 and latest["gate"]["passed"]


def test_a_monitor_stops_a_candidate_whose_primary_score_passes():
    scores = {b"current": (0.8, 0.30), b"candidate": (0.8, 0.10), b"slower": (0.8, 0.27)}
    calls = []

    def success(data):
        calls.append(data)
        return scores[data][0]

    gate = gates.Gate(success, 0.05, monitors={"pro": (lambda data: scores[data][1], 0.05)})
    stopped = gate.check(b"candidate", b"current")
    assert stopped["candidate"] == stopped["current"] == 0.8 and not stopped["passed"]
    assert stopped["monitors"]["pro"] == {"candidate": 0.10, "current": 0.30, "margin": 0.05, "passed": False}
    assert gate.check(b"slower", b"current")["passed"]  # within the monitor's margin
    assert calls.count(b"current") == 1  # scores of files already seen are cached, per evaluation


def test_the_pro_gate_scores_the_twin_episodes_of_the_success_gate(fleet_root, tmp_path):
    """The real "sim+pro" gate: the C twin runs the prior's file through the numpy client once, and
    PRO scores those very episodes."""
    base = configs.get_config("debug")
    target = configs.TargetConfig(prior=str(fleet_root / "prior"))
    fleet = configs.FleetConfig(root=str(tmp_path), offline_data="")
    learner = FleetLearner(configs.dataclasses.replace(base, fleet=fleet, target=target))
    write_tiny_state_pro(tmp_path / "pro", learner.prior.stats)
    fleet = configs.FleetConfig(gate="sim+pro", pro=str(tmp_path / "pro"), gate_episodes=1)
    gate = gates.make_gate(fleet, target)
    data = learner.registry.read(0)
    verdict = gate.check(data, data)
    assert verdict["passed"] and verdict["candidate"] == verdict["current"]
    pro_verdict = verdict["monitors"]["pro"]
    assert np.isfinite(pro_verdict["candidate"]) and pro_verdict["candidate"] == pro_verdict["current"]
    with pytest.raises(ValueError, match="needs a trained PRO"):
        gates.make_gate(configs.FleetConfig(gate="sim+pro"), target)
