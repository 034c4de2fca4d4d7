"""The fleet's state on disk: the episode store the service writes and the learner reads, and the params
registry the learner writes and the service serves. Two processes share them through files alone.

Episode store, `<root>/`:

    incoming/<seq>-<episode_id>.msgpack   one validated episode each (jaxvla.actor.wire), committed
    rlds/part_<first>_<last>/             RLDS datasets (jaxvla.episodes) of compacted episodes
    rlds/part_<first>_<last>.ids.json     [[seq, episode_id], ...] of that part
    labels/<episode_id>.json              operator reward labels that arrived after the episode

Why two stages: the acknowledgement must wait for durability, and an RLDS dataset is written by tfds as a
whole (a folder of shards renamed into place), far too slow per episode. So `commit` writes the episode's
msgpack to a temporary file, fsyncs it, and renames it into `incoming/` under a lock that also assigns
its sequence number; only then does the service answer 2xx. `compact` later turns a run of committed
episodes into one RLDS part: it writes the part's id list, then the dataset (atomic), and only then
deletes the msgpack files. A crash at any point leaves every committed episode in exactly one place after
`recover` (startup): half-written temporary files were never acknowledged and are removed, an id list
without its dataset is removed, a msgpack file whose id is already in a part is removed.

Sequence numbers are assigned at the rename, under the lock, so the committed episodes are always the
contiguous range 0 .. n-1: a reader that has consumed everything up to `seq` (the learner's cursor) can
never skip an episode that another thread was still writing.

Params registry, `<root>/params/`: `policy-v<version>.msgpack` (the exported file) and `registry.json`
(the published versions, newest last, each with parent, sha256 of the weights and of the whole file,
size and the gate's verdict). A file is written before the registry names it; both writes are atomic.
"""

import hashlib
import json
import os
import pathlib
import re
import threading
import time
import uuid

from jaxvla import episodes as rlds
from jaxvla.actor import fileformat
from jaxvla.actor import wire

INCOMING = re.compile(r"(\d{10})-([0-9a-f-]{36})\.msgpack")
PART = re.compile(r"part_(\d{10})_(\d{10})")


def _json_atomic(path: pathlib.Path, payload) -> None:
    fileformat.write_atomic(path, json.dumps(payload, indent=1).encode())


class EpisodeStore:
    """Durable, idempotent episode storage. `commit` and `compact` block on disk: call them off the
    event loop. One writer process; any number of reader processes (`read_since`)."""

    def __init__(self, root: str | os.PathLike, observation_spec: dict = rlds.OBSERVATION_SPEC, *,
                 writer: bool = True):  # fmt: skip
        """`writer`: the one process that commits (it recovers the store first); readers pass False."""
        self.root = pathlib.Path(root)
        self.incoming, self.parts, self.labels_dir = (self.root / n for n in ("incoming", "rlds", "labels"))
        self.observation_spec = observation_spec
        self._lock = threading.Lock()  # commit's rename + seq, and compaction's view of incoming/
        self._ids: dict[str, int] = {}
        self._next_seq = 0
        if writer:
            self.recover()

    # ---------------------------------------------------------------------------------------- writing
    def recover(self) -> None:
        """Rebuilds the id index from disk and removes what a crash left half-done (see module doc)."""
        for folder in (self.incoming, self.parts, self.labels_dir):
            folder.mkdir(parents=True, exist_ok=True)
        for stale in self.incoming.glob(".*"):
            stale.unlink()
        ids: dict[str, int] = {}
        for sidecar in sorted(self.parts.glob("part_*.ids.json")):
            dataset = self.parts / sidecar.name.removesuffix(".ids.json")
            if not any(dataset.glob("*/dataset_info.json")):
                sidecar.unlink()  # compaction died before the dataset landed; its episodes are in incoming/
                continue
            ids.update((episode_id, seq) for seq, episode_id in json.loads(sidecar.read_text()))
        for path in self.incoming.iterdir():
            match = INCOMING.fullmatch(path.name)
            if match is None:
                continue
            seq, episode_id = int(match[1]), match[2]
            if episode_id in ids:
                path.unlink()  # compacted, but the crash came before the msgpack file was deleted
            else:
                ids[episode_id] = seq
        fileformat.fsync_folder(self.incoming)
        self._ids = ids
        self._next_seq = max(ids.values(), default=-1) + 1

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, episode_id: str) -> bool:
        return episode_id in self._ids

    def commit(self, episode: dict) -> tuple[int, bool]:
        """Stores one validated episode durably; returns (seq, created). created is False if its
        episode_id was already stored (then nothing is written)."""
        episode_id = episode["episode_metadata"]["episode_id"]
        if episode_id in self._ids:
            return self._ids[episode_id], False
        fd, tmp = _temporary(self.incoming)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(wire.packb(episode))
                f.flush()
                os.fsync(f.fileno())
            with self._lock:
                if episode_id in self._ids:  # a concurrent push of the same episode won
                    return self._ids[episode_id], False
                seq = self._next_seq
                os.replace(tmp, self.incoming / f"{seq:010d}-{episode_id}.msgpack")
                fileformat.fsync_folder(self.incoming)
                self._ids[episode_id] = seq
                self._next_seq += 1
        finally:
            pathlib.Path(tmp).unlink(missing_ok=True)
        return seq, True

    def label(self, episode_id: str, operator_reward: float, success: bool | None) -> bool:
        """Records the operator's outcome label for a stored episode; False if the episode is unknown."""
        if episode_id not in self._ids:
            return False
        payload = {"operator_reward": float(operator_reward), "success": success, "time": time.time()}
        _json_atomic(self.labels_dir / f"{episode_id}.json", payload)
        return True

    def compact(self, min_episodes: int = 1) -> int:
        """Moves committed msgpack episodes into one new RLDS part if at least `min_episodes` wait;
        returns how many moved. Reads of the store stay consistent throughout (module doc)."""
        with self._lock:
            waiting = sorted(p for p in self.incoming.iterdir() if INCOMING.fullmatch(p.name))
        if len(waiting) < max(min_episodes, 1):
            return 0
        seqs = [int(INCOMING.fullmatch(p.name)[1]) for p in waiting]
        name = f"part_{seqs[0]:010d}_{seqs[-1]:010d}"
        pairs = [[seq, INCOMING.fullmatch(p.name)[2]] for seq, p in zip(seqs, waiting, strict=True)]
        _json_atomic(self.parts / f"{name}.ids.json", pairs)
        episodes = (wire.unpackb(p.read_bytes()) for p in waiting)
        rlds.write_episodes(self.parts / name, episodes, observation_spec=self.observation_spec)
        for path in waiting:
            path.unlink()
        fileformat.fsync_folder(self.incoming)
        return len(waiting)

    # ---------------------------------------------------------------------------------------- reading
    def read_since(self, cursor: int, limit: int | None = None) -> list[tuple[int, dict]]:
        """Committed episodes with seq > cursor, oldest first, at most `limit`: [(seq, episode)].

        Safe while the writer commits and compacts: incoming/ is read before rlds/ is listed, and
        compaction lands a part before deleting its msgpack files, so a file that vanished before it could
        be read is in a part the listing after it finds.
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
            seq_of = {episode_id: seq for seq, episode_id in json.loads(sidecar.read_text())}
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


def _temporary(folder: pathlib.Path) -> tuple[int, str]:
    path = folder / f".{uuid.uuid4().hex}.tmp"
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), str(path)


class ParamsRegistry:
    """The published params versions. The learner `publish`es; the service reads `latest` / `read`."""

    def __init__(self, root: str | os.PathLike):
        self.root = pathlib.Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._index = self.root / "registry.json"
        self._cache: tuple[int, list[dict]] = (-1, [])

    def entries(self) -> list[dict]:
        """Published versions, oldest first (re-read when the file changes)."""
        try:
            mtime = self._index.stat().st_mtime_ns
        except FileNotFoundError:
            return []
        if mtime != self._cache[0]:
            self._cache = (mtime, json.loads(self._index.read_text()))
        return self._cache[1]

    def latest(self) -> dict | None:
        entries = self.entries()
        return entries[-1] if entries else None

    def entry(self, version: int) -> dict | None:
        return next((e for e in self.entries() if e["version"] == version), None)

    def path(self, version: int) -> pathlib.Path:
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
        fileformat.write_atomic(self.path(entry["version"]), data)
        _json_atomic(self._index, [*self.entries(), entry])
        return entry
