"""The fleet's learner: store -> replay -> SAC rounds -> gate -> published params, resumable at any moment.

It reuses the patching learner whole (`patch.new_learner`, `sac.make_train_steps`,
`patch.insert_experience`) and only changes where experience comes from: episodes the robots pushed to
the service, read from the episode store in commit order (`EpisodeStore.read_since`).

- Ingest: new episodes go into replay in groups of exactly `fleet.ingest_episodes`, in store order, each
  group one `replay.from_episodes` block padded to a fixed length. So the replay's contents are a function
  of the store alone, not of when the learner happened to look. An operator label that arrived for an
  episode replaces the reward of its last step.
- Round: after `fleet.episodes_per_round` new episodes, `patch.updates_per_round` fused SAC steps; the
  actor's params are exported as a candidate (`<root>/candidates/`), the gate compares it with the
  published params, and a passing candidate is published (`<root>/params/`, version = prior step +
  round, parent = the published version).
- Checkpoint: after every round, orbax saves the SAC state and the replay with the store cursor, so a
  learner killed at any point restarts from its last round with the same replay contents and ingests the
  episodes after the cursor again. Keys are `fold_in(key, round)`, so the resumed rounds are the same.
"""

import dataclasses
import hashlib
import json
import pathlib
import time

import jax
import numpy as np
from etils import epath

from configs import Config
from jaxvla import episodes as rlds
from jaxvla import export
from jaxvla.actor import fileformat
from learner import patch
from learner import pretrain
from learner import replay
from learner import sac
from learner import sharding
from learner.checkpoints import Checkpoints
from learner.fleet import gate as gates
from learner.fleet.store import EpisodeStore
from learner.fleet.store import ParamsRegistry

PAD = 128  # block lengths are padded to a multiple of this: a handful of insert compiles, not one per T


def tree_digest(tree) -> str:
    """sha256 over every array of a pytree (replay buffers, params): equal digests, equal contents."""
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(jax.device_get(tree)):
        digest.update(np.ascontiguousarray(leaf).tobytes())
    return digest.hexdigest()


def labelled(episode: dict, label: dict | None) -> dict:
    """The episode with the operator's later label applied: the reward of its last step and its outcome."""
    if label is None:
        return episode
    reward = np.array(episode["steps"]["reward"], np.float32)
    reward[-1] = label["operator_reward"]
    metadata = dict(episode["episode_metadata"], operator_reward=label["operator_reward"])
    if label.get("success") is not None:
        metadata["success"] = label["success"]
    return {"steps": {**episode["steps"], "reward": reward}, "episode_metadata": metadata}


def padded_block(episodes: list[dict], rows: int) -> dict:
    """`replay.from_episodes` with its time axis padded (valid=False) to a multiple of PAD."""
    block = replay.from_episodes(episodes, rows=rows)
    length = block["valid"].shape[1]
    extra = -length % PAD
    return jax.tree.map(lambda x: np.pad(x, [(0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 2)), block)


class FleetLearner:
    """One learner over `<fleet.root>`: call `run()` (or `ingest` / `train_round` step by step)."""

    def __init__(
        self, config: Config, *, evaluation: gates.Evaluation | None = None, mesh=None, progress: bool = False
    ):
        fc, pc, tc = config.fleet, config.patch, config.target
        self.config, self.root = config, pathlib.Path(fc.root)
        self.mesh = mesh or sharding.make_mesh()
        # The store and registry are shared with the service and may be object storage (gs://...);
        # the learner's own files below (candidates, log, checkpoints) are local.
        self.store = EpisodeStore(epath.Path(fc.root) / "store", writer=False)
        self.registry = ParamsRegistry(epath.Path(fc.root) / "params")
        self.candidates = self.root / "candidates"
        self.log_path = self.root / "learner" / "log.jsonl"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.gate = gates.Gate(evaluation, fc.gate_margin) if evaluation else gates.make_gate(fc, tc)
        self.prior = pretrain.load(pathlib.Path(tc.prior))
        mc = self.prior.model
        config = dataclasses.replace(config, model=mc)  # the learner's networks are the prior's
        offline = self._offline(fc.offline_data.format(task=tc.task), pc.offline_episodes)
        self.learner = patch.new_learner(config, self.prior, offline, self.mesh, fc.seed)
        nets = sac.Networks(
            actor=self.prior.graphdef, critic=patch.critic_graphdef(mc), stats=self.prior.stats
        )
        self.train = sac.make_train_steps(
            sac.make_spec(config.sac, mc, nets), num_steps=pc.updates_per_round, mesh=self.mesh
        )
        self.insert = patch.make_insert()
        self.checkpoints = Checkpoints(self.root / "learner" / "checkpoints", keep=2)
        self.cursor, self.pending = -1, 0  # last ingested seq; episodes ingested since the last round
        self.key_train = jax.random.fold_in(jax.random.key(fc.seed), 1)
        if self.checkpoints.latest_step() is not None:
            self._restore()
        self._publish_prior()

    # -------------------------------------------------------------------------------------- set-up
    @staticmethod
    def _offline(path: str, count: int) -> list[dict]:
        if not path or count == 0:
            return []
        return rlds.read_episodes(path)[:count]

    def _restore(self) -> None:
        saved, meta = self.checkpoints.restore(self.learner.checkpointed())
        self.learner = patch.Learner(saved["sac"], saved["replay"], meta["round"], meta["totals"])
        self.cursor, self.pending = meta["cursor"], meta["pending"]
        digest = tree_digest(self.learner.buffers)
        self.log(
            {
                "event": "resumed",
                "round": meta["round"],
                "cursor": self.cursor,
                "replay_digest": digest,
                "saved_digest": meta["replay_digest"],
            }
        )

    def _publish_prior(self) -> None:
        """The prior's policy is the first published version (its training step), if none is yet."""
        if self.registry.latest() is not None:
            return
        data = self._export(self.prior.params, self.prior.step, None, {"source": "prior"})
        entry = self.registry.publish(data, {"initial": True})
        self.log({"event": "published", "version": entry["version"], "initial": True})

    def _export(self, params, version: int, parent: int | None, extra: dict) -> bytes:
        path = export.write(
            self.candidates,
            self.prior.model,
            params,
            self.prior.stats,
            version=version,
            parent_version=parent,
            config_hash=self.prior.config_hash,
            extra=extra,
        )
        return path.read_bytes()

    def log(self, record: dict) -> None:
        with self.log_path.open("a") as f:
            f.write(json.dumps({"time": time.time(), **record}) + "\n")

    # ------------------------------------------------------------------------------------ the loop
    def ingest(self) -> int:
        """Inserts every complete group of new store episodes into replay; returns episodes ingested."""
        fc = self.config.fleet
        group = fc.ingest_episodes
        # Never past the round boundary: rounds then see the same replay however far behind the learner is.
        new = self.store.read_since(self.cursor, limit=fc.episodes_per_round - self.pending)
        usable = len(new) - len(new) % group
        labels = self.store.labels() if usable else {}
        for start in range(0, usable, group):
            chunk = new[start : start + group]
            episodes = [labelled(ep, labels.get(ep["episode_metadata"]["episode_id"])) for _, ep in chunk]
            block = padded_block(episodes, rows=self.mesh.size)
            buffers = patch.insert_experience(self.insert, self.learner.buffers, block)
            self.learner = dataclasses.replace(self.learner, buffers=buffers)
            self.cursor = chunk[-1][0]
            self.pending += len(chunk)
        return usable

    def train_round(self) -> dict:
        """SAC updates, candidate export, gate, publish if it passes, checkpoint; the round's record."""
        tic = time.perf_counter()
        round_ = self.learner.round + 1
        state, metrics = self.train(
            self.learner.state, self.learner.buffers, jax.random.fold_in(self.key_train, round_)
        )
        jax.block_until_ready(state)
        self.learner = dataclasses.replace(self.learner, state=state, round=round_)
        train_s = time.perf_counter() - tic
        proposal = self.propose(state.actor, round_)
        self.pending = 0
        record = {
            "event": "round",
            "round": round_,
            "cursor": self.cursor,
            "train_s": train_s,
            "gate_s": time.perf_counter() - tic - train_s,
            **proposal,
            **{k: float(v) for k, v in jax.device_get(metrics).items()},
        }
        digest = tree_digest(self.learner.buffers)
        meta = {
            "round": round_,
            "totals": self.learner.totals,
            "cursor": self.cursor,
            "pending": 0,
            "replay_digest": digest,
        }
        self.checkpoints.save(round_, self.learner.checkpointed(), meta)
        self.checkpoints.manager.wait_until_finished()  # the log below claims the round is saved
        self.log({**record, "replay_digest": digest, "params_digest": tree_digest(state.actor)})
        return record

    def propose(self, params, round_: int) -> dict:
        """Exports `params` as round `round_`'s candidate, gates it against the newest earlier version
        and publishes it if it passes: {"gate": verdict, "published": version or None}."""
        version = self.prior.step + round_
        current = [e for e in self.registry.entries() if e["version"] < version][-1]
        candidate = self._export(params, version, current["version"], {"round": round_})
        verdict = self.gate.check(candidate, self.registry.read(current["version"]))
        published = self._publish(candidate, verdict) if verdict["passed"] else None
        return {"gate": verdict, "published": published}

    def _publish(self, candidate: bytes, verdict: dict) -> int:
        """Publishes a candidate, unless a previous life of this learner already published this round's
        (killed after publishing, before its checkpoint: the redone round exports the same params)."""
        manifest, _ = fileformat.unpack(candidate)
        existing = self.registry.entry(manifest["version"])
        if existing is None:
            return self.registry.publish(candidate, verdict)["version"]
        if existing["sha256"] != manifest["sha256"]:
            raise RuntimeError(f"version {manifest['version']} was published with other weights")
        return existing["version"]

    def run(self, rounds: int = 0, poll_s: float = 1.0) -> None:
        """Ingests and trains until `rounds` rounds are done (0: forever)."""
        while rounds == 0 or self.learner.round < rounds:
            ingested = self.ingest()
            if self.pending >= self.config.fleet.episodes_per_round:
                self.train_round()
            elif not ingested:
                time.sleep(poll_s)
        self.checkpoints.close()
