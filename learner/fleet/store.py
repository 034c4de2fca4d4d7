"""The fleet's state on disk: the episode store the service writes and the learner reads, and the params
registry the learner writes and the service serves. Two processes share them through files alone.

Episode store, `<root>/`:

    incoming/<seq>-<episode_id>.msgpack   one validated episode each (jaxvla.actor.wire), committed
    rlds/part_<first>_<last>/             RLDS datasets (jaxvla.episodes) of compacted episodes
    rlds/part_<first>_<last>.ids.json     [[seq, episode_id, robot_id], ...] of that part
    quarantine/<seq>-<episode_id>.msgpack an episode compaction could not write, beside `.reason`
    labels/<episode_id>.json              operator reward labels that arrived after the episode
    summaries.jsonl                       one line per episode (robot, version, outcome, time) for the
                                          fleet page; derived data, rebuilt for incoming/ at start-up

Why two stages: the acknowledgement must wait for durability, and an RLDS dataset is written by tfds as a
whole (a folder of shards renamed into place), far too slow per episode. So `commit` writes the episode's
msgpack to a temporary file, fsyncs it, and renames it into `incoming/` under a lock that also assigns
its sequence number; only then does the service answer 2xx. `compact` later turns a run of at most
`max_episodes` committed episodes into one RLDS part: it writes the part's id list, then the dataset
(atomic), and only then deletes the msgpack files. A crash at any point leaves every committed episode in
exactly one place after `recover` (startup): half-written temporary files were never acknowledged and are
removed, as are tfds's half-written part folders; an id list without its dataset is removed, a msgpack
file whose id is already in a part is removed. An episode the RLDS writer's check refuses (one an older
service accepted) is moved to quarantine/ with its reason, so it never blocks the others; it stays
acknowledged (a re-push is a duplicate) but the learner never reads it.

Sequence numbers are assigned at the rename, under the lock, so the committed episodes are always the
contiguous range 0 .. n-1: a reader that has consumed everything up to `seq` (the learner's cursor) can
never skip an episode that another thread was still writing.

Params registry, `<root>/params/`: `policy-v<version>.msgpack` (the exported file) and `registry.json`
(the published versions, newest last, each with parent, sha256 of the weights and of the whole file,
size and the gate's verdict). A file is written before the registry names it; both writes are atomic.

Roots are `etils.epath` paths: a local folder, or object storage such as `gs://bucket/fleet` (tfds and
array_record read and write those). On a local disk every write is fsynced (and its folder); an object
store makes an object durable and visible whole when its upload completes.
"""

import hashlib
import json
import logging
import os
import re
import threading
import time
import uuid

import numpy as np
from etils import epath

from jaxvla import episodes as rlds
from jaxvla.actor import fileformat
from jaxvla.actor import wire

INCOMING = re.compile(r"(\d{10})-([0-9a-f-]{36})\.msgpack")
PART = re.compile(r"part_(\d{10})_(\d{10})")
log = logging.getLogger(__name__)


class CompactionStopped(Exception):
    """`stop` was set while a part was being written; the part was abandoned, nothing moved."""


def is_local(path: epath.Path) -> bool:
    """A path on this machine's file system (fsync applies), not object storage."""
    return "://" not in os.fspath(path)


def _fsync_folder(folder: epath.Path) -> None:
    if is_local(folder):
        fileformat.fsync_folder(folder)


def write_durable(target: epath.Path, data: bytes) -> None:
    """Readers see the old object or the whole new one, even across a crash: a temporary name, then a
    rename; locally with fsyncs of the file and its folder."""
    tmp = target.parent / f".{target.name}.{uuid.uuid4().hex}.tmp"
    try:
        _write_synced(tmp, data)
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_folder(target.parent)


def _write_synced(path: epath.Path, data: bytes) -> None:
    with path.open("wb") as f:
        f.write(data)
        if is_local(path):
            f.flush()
            os.fsync(f.fileno())


def _json_atomic(path: epath.Path, payload) -> None:
    write_durable(path, json.dumps(payload, indent=1).encode())


def summary(seq: int, episode: dict, committed: float) -> dict:
    """What the fleet page shows of one episode: who ran which version, and how it went."""
    metadata = episode["episode_metadata"]
    return {
        "seq": seq,
        "episode_id": metadata["episode_id"],
        "robot_id": metadata["robot_id"],
        "policy_version": metadata["policy_version"],
        "success": bool(metadata["success"]),
        "takeover": bool(np.any(episode["steps"]["is_intervention"])),
        "time": committed,
    }


class EpisodeStore:
    """Durable, idempotent episode storage. `commit` and `compact` block on disk: call them off the
    event loop. One writer process; any number of reader processes (`read_since`)."""

    def __init__(
        self, root: str | os.PathLike, observation_spec: dict = rlds.OBSERVATION_SPEC, *, writer: bool = True
    ):
        """`writer`: the one process that commits (it recovers the store first); readers pass False."""
        self.root = epath.Path(root)
        self.incoming, self.parts, self.labels_dir, self.quarantine = (
            self.root / n for n in ("incoming", "rlds", "labels", "quarantine")
        )
        self.summaries_path = self.root / "summaries.jsonl"
        self.observation_spec = observation_spec
        self._lock = threading.Lock()  # commit's rename + seq, and compaction's view of incoming/
        self._ids: dict[str, int] = {}
        self._next_seq = 0
        self._waiting = 0  # episodes in incoming/, the compaction backlog
        self._quarantined = 0
        if writer:
            self.recover()

    # ---------------------------------------------------------------------------------------- writing
    def recover(self) -> None:
        """Rebuilds the id index from disk and removes what a crash left half-done (see module doc)."""
        for folder in (self.incoming, self.parts, self.labels_dir, self.quarantine):
            folder.mkdir(parents=True, exist_ok=True)
        for stale in self.incoming.glob(".*"):
            stale.unlink()
        for debris in self.parts.glob(".part_*"):  # tfds's temporary folders of an interrupted part
            debris.rmtree() if debris.is_dir() else debris.unlink()
        ids: dict[str, int] = {}
        for sidecar in sorted(self.parts.glob("part_*.ids.json")):
            dataset = self.parts / sidecar.name.removesuffix(".ids.json")
            if not any(dataset.glob("*/dataset_info.json")):
                sidecar.unlink()  # compaction died before the dataset landed; its episodes are in incoming/
                if dataset.exists():
                    dataset.rmtree()
                continue
            ids.update((row[1], row[0]) for row in json.loads(sidecar.read_text()))
        quarantined = [INCOMING.fullmatch(p.name) for p in self.quarantine.iterdir()]
        ids.update((m[2], int(m[1])) for m in quarantined if m)
        waiting = []
        for path in list(self.incoming.iterdir()):
            match = INCOMING.fullmatch(path.name)
            if match is None:  # an episode_id an older service accepted but no reader finds
                self._quarantine(path, f"{path.name} is not a store file name (seq-uuid, canonical)")
                continue
            seq, episode_id = int(match[1]), match[2]
            if episode_id in ids:
                path.unlink()  # compacted, but the crash came before the msgpack file was deleted
            else:
                ids[episode_id] = seq
                waiting.append((seq, path))
        _fsync_folder(self.incoming)
        self._ids, self._waiting = ids, len(waiting)
        names = [p.name for p in self.quarantine.iterdir()]
        self._quarantined = sum(not (n.startswith(".") or n.endswith(".reason")) for n in names)
        self._next_seq = max(ids.values(), default=-1) + 1
        self._summarise_missing(sorted(waiting))

    def _summarise_missing(self, waiting: list[tuple[int, epath.Path]]) -> None:
        """Appends the summary lines a crash lost (they are written after the acknowledgement)."""
        known = {s["seq"] for s in self.summaries()}
        lines = []
        for seq, path in waiting:
            if seq not in known:
                try:
                    lines.append(summary(seq, wire.unpackb(path.read_bytes()), path.stat().mtime))
                except (wire.WireError, KeyError, TypeError):
                    continue  # not an episode the page can show; compaction will quarantine it
        self._append_summaries(lines)

    def _append_summaries(self, records: list[dict]) -> None:
        # Object stores cannot append: there the fleet page has no per-episode history.
        if records and is_local(self.summaries_path):
            with self.summaries_path.open("a") as f:
                f.write("".join(json.dumps(record) + "\n" for record in records))

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, episode_id: str) -> bool:
        return episode_id in self._ids

    @property
    def backlog(self) -> int:
        """Committed episodes still waiting in incoming/ for compaction."""
        return self._waiting

    @property
    def quarantined(self) -> int:
        return self._quarantined

    def commit(self, episode: dict) -> tuple[int, bool]:
        """Stores one validated episode durably; returns (seq, created). created is False if its
        episode_id was already stored (then nothing is written)."""
        episode_id = episode["episode_metadata"]["episode_id"]
        if episode_id in self._ids:
            return self._ids[episode_id], False
        tmp = self.incoming / f".{uuid.uuid4().hex}.tmp"
        try:
            _write_synced(tmp, wire.packb(episode))
            with self._lock:
                if episode_id in self._ids:  # a concurrent push of the same episode won
                    return self._ids[episode_id], False
                seq = self._next_seq
                tmp.replace(self.incoming / f"{seq:010d}-{episode_id}.msgpack")
                _fsync_folder(self.incoming)
                self._ids[episode_id] = seq
                self._next_seq += 1
                self._waiting += 1
                self._append_summaries([summary(seq, episode, time.time())])
        finally:
            tmp.unlink(missing_ok=True)
        return seq, True

    def robot_of(self, episode_id: str) -> str | None:
        """The robot that pushed a stored episode, or None if the episode is unknown."""
        seq = self._ids.get(episode_id)
        if seq is None:
            return None
        name = f"{seq:010d}-{episode_id}.msgpack"
        for folder in (self.incoming, self.quarantine):
            try:
                return wire.unpackb((folder / name).read_bytes())["episode_metadata"]["robot_id"]
            except FileNotFoundError:
                continue  # compacted meanwhile: its part names it
        for sidecar in self.parts.glob("part_*.ids.json"):
            first, last = map(int, PART.match(sidecar.name).groups())
            rows = {row[1]: row for row in json.loads(sidecar.read_text())} if first <= seq <= last else {}
            if episode_id in rows:
                row = rows[episode_id]
                return row[2] if len(row) > 2 else self._robot_in_part(sidecar, episode_id)
        return None

    def _robot_in_part(self, sidecar: epath.Path, episode_id: str) -> str:
        """Reads the robot from the part itself: id lists written before they named robots lack it."""
        dataset = self.parts / sidecar.name.removesuffix(".ids.json")
        metadata = [ep["episode_metadata"] for ep in rlds.read_episodes(dataset)]
        return next(m["robot_id"] for m in metadata if m["episode_id"] == episode_id)

    def label(self, episode_id: str, operator_reward: float, success: bool | None) -> bool:
        """Records the operator's outcome label for a stored episode; False if the episode is unknown."""
        if episode_id not in self._ids:
            return False
        payload = {"operator_reward": float(operator_reward), "success": success, "time": time.time()}
        _json_atomic(self.labels_dir / f"{episode_id}.json", payload)
        return True

    def compact(
        self, min_episodes: int = 1, max_episodes: int = 256, stop: threading.Event | None = None
    ) -> int:
        """Moves the oldest committed msgpack episodes, at most `max_episodes`, into one new RLDS part if at
        least `min_episodes` wait; returns how many moved (quarantined ones included). An episode that
        cannot be written goes to quarantine/ with its reason. Setting `stop` abandons the part between
        two episodes (CompactionStopped; nothing moved). Reads stay consistent throughout (module doc)."""
        with self._lock:
            waiting = sorted(p for p in self.incoming.iterdir() if INCOMING.fullmatch(p.name))
        if len(waiting) < max(min_episodes, 1):
            return 0
        waiting = waiting[:max_episodes]
        good = []  # [(path, episode)]
        for path in waiting:
            episode, reason = _read_writable(path, self.observation_spec)
            if reason is None:
                good.append((path, episode))
            else:
                self._quarantine(path, reason)
        if good:
            self._write_part(good, stop)
        with self._lock:
            self._waiting -= len(good)
        return len(waiting)

    def _write_part(self, good: list[tuple[epath.Path, dict]], stop: threading.Event | None) -> None:
        paths, episodes = zip(*good, strict=True)
        matches = [INCOMING.fullmatch(p.name) for p in paths]
        name = f"part_{int(matches[0][1]):010d}_{int(matches[-1][1]):010d}"
        rows = [
            [int(m[1]), m[2], ep["episode_metadata"]["robot_id"]]
            for m, ep in zip(matches, episodes, strict=True)
        ]
        sidecar = self.parts / f"{name}.ids.json"
        _json_atomic(sidecar, rows)

        def unless_stopped():
            for episode in episodes:
                if stop is not None and stop.is_set():
                    raise CompactionStopped(f"stopped while writing {name}")
                yield episode

        try:
            rlds.write_episodes(self.parts / name, unless_stopped(), observation_spec=self.observation_spec)
        except BaseException:
            sidecar.unlink(missing_ok=True)  # the part never landed; its episodes stay in incoming/
            raise
        for path in paths:
            path.unlink()
        _fsync_folder(self.incoming)

    def _quarantine(self, path: epath.Path, reason: str) -> None:
        """Moves an episode compaction cannot write aside, with its reason; it stays acknowledged."""
        write_durable(self.quarantine / f"{path.name}.reason", reason.encode())
        path.replace(self.quarantine / path.name)
        _fsync_folder(self.incoming)
        with self._lock:  # recover() sets both counts afresh afterwards
            self._waiting -= 1
            self._quarantined += 1
        log.error("quarantined %s: %s", path.name, reason[:500])

    # ---------------------------------------------------------------------------------------- reading
    def read_since(self, cursor: int, limit: int | None = None) -> list[tuple[int, dict]]:
        """Committed episodes with seq > cursor, oldest first, at most `limit`: [(seq, episode)].

        Safe while the writer commits and compacts: incoming/ is read before rlds/ is listed, and
        compaction lands a part before deleting its msgpack files, so a file that vanished before it could
        be read is in a part the listing after it finds. Quarantined episodes are not returned.
        """
        found: dict[int, dict] = {}
        for path in sorted(p for p in self.incoming.iterdir() if INCOMING.fullmatch(p.name)):
            seq = int(INCOMING.fullmatch(path.name)[1])
            if seq <= cursor:
                continue
            try:
                found[seq] = wire.unpackb(path.read_bytes())
            except FileNotFoundError:
                continue  # compacted meanwhile: the part listing below has it
        for sidecar in sorted(self.parts.glob("part_*.ids.json")):
            first, last = map(int, PART.match(sidecar.name).groups())
            dataset = self.parts / sidecar.name.removesuffix(".ids.json")
            if last <= cursor or all(seq in found for seq in range(max(first, cursor + 1), last + 1)):
                continue
            if not any(dataset.glob("*/dataset_info.json")):
                continue
            seq_of = {row[1]: row[0] for row in json.loads(sidecar.read_text())}
            for episode in rlds.read_episodes(dataset):
                seq = seq_of[episode["episode_metadata"]["episode_id"]]
                if seq > cursor:
                    found.setdefault(seq, episode)
        ordered = sorted(found.items())
        return ordered[:limit] if limit is not None else ordered

    def episode_ids(self) -> list[str]:
        """Every stored episode id in commit order."""
        return [episode_id for episode_id, _ in sorted(self._ids.items(), key=lambda kv: kv[1])]

    def labels(self) -> dict[str, dict]:
        return {p.stem: json.loads(p.read_text()) for p in self.labels_dir.glob("*.json")}

    def summaries(self) -> list[dict]:
        """One record per committed episode (`summary`), in commit order; a line cut by a crash is skipped."""
        if not self.summaries_path.exists():
            return []
        records = {}
        for line in self.summaries_path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            records[record["seq"]] = record
        return [records[seq] for seq in sorted(records)]


def _read_writable(path: epath.Path, observation_spec: dict) -> tuple[dict | None, str | None]:
    """(the episode in `path`, None) if it can go into an RLDS part, else (None, why not)."""
    try:
        episode = wire.unpackb(path.read_bytes())
        rlds.check_episode(episode, observation_spec)
    except (ValueError, TypeError, KeyError) as err:  # WireError is a ValueError
        return None, f"{type(err).__name__}: {err}"
    return episode, None


class ParamsRegistry:
    """The published params versions. The learner `publish`es; the service reads `latest` / `read`."""

    def __init__(self, root: str | os.PathLike):
        self.root = epath.Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._index = self.root / "registry.json"
        self._cache: tuple[tuple[int, int], list[dict]] = ((-1, -1), [])

    def entries(self) -> list[dict]:
        """Published versions, oldest first (re-read when the file changes)."""
        try:
            stat = self._index.stat()
        except FileNotFoundError:
            return []
        # Every publish rewrites the index longer, so (mtime, length) changes even within one second.
        key = (int(stat.mtime), stat.length)
        if key != self._cache[0]:
            self._cache = (key, json.loads(self._index.read_text()))
        return self._cache[1]

    def latest(self) -> dict | None:
        entries = self.entries()
        return entries[-1] if entries else None

    def entry(self, version: int) -> dict | None:
        return next((e for e in self.entries() if e["version"] == version), None)

    def path(self, version: int) -> epath.Path:
        return self.root / f"policy-v{version:06d}.msgpack"

    def read(self, version: int) -> bytes | None:
        """The file of a published version, or None if that version was never published."""
        return self.path(version).read_bytes() if self.entry(version) else None

    def publish(self, data: bytes, gate: dict | None = None) -> dict:
        """Verifies an exported policy file, stores it and names it the latest version; returns its entry.

        Versions only grow: a file whose version is not above the latest raises ValueError.
        """
        manifest, _ = fileformat.unpack(data)
        latest = self.latest()
        if latest is not None and manifest["version"] <= latest["version"]:
            raise ValueError(
                f"version {manifest['version']} is not newer than the published {latest['version']}"
            )
        entry = {
            "version": manifest["version"],
            "parent_version": manifest["parent_version"],
            "sha256": manifest["sha256"],
            "file_sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data),
            "published": time.time(),
            "gate": gate or {},
        }
        write_durable(self.path(entry["version"]), data)
        _json_atomic(self._index, [*self.entries(), entry])
        return entry
