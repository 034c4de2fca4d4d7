"""The robot's side of the fleet protocol: an HTTP client, an on-disk spool that survives outages, and the
background params pull. Standard library (urllib, threading), numpy and msgpack only.

Every episode goes to the spool first (one fsynced file each) and an `Uploader` thread pushes the oldest
file until the service answers 2xx; only then is the file deleted. While the service is unreachable the
uploader retries with exponential backoff and jitter, the robot keeps working, and the spool drains once
the service is back. A 4xx answer is final (retrying cannot help): the file moves to `rejected/` beside a
`.reason` file. The spool holds at most `max_episodes` files; when it is full `put` raises `SpoolFull`,
and the robot should wait rather than lose an episode.

`ParamsPuller` polls the manifest and, for a newer version, downloads the file, checks its sha256 against
the manifest, lets `jaxvla.actor.loads` verify the format and the weights' checksums, and only then swaps
the policy (one reference assignment). Any failure keeps the last good policy. The last good file is
cached on disk, so a restarted robot starts with it even if the service is down.
"""

import hashlib
import http.client
import json
import logging
import os
import pathlib
import random
import threading
import time
import urllib.error
import urllib.request

from jaxvla.actor import fileformat
from jaxvla.actor import policy as actor_policy
from jaxvla.actor import wire

MSGPACK = "application/msgpack"
LOG = logging.getLogger("jaxvla.actor")


class ServiceUnavailable(Exception):
    """The service could not be reached or answered 5xx / 429: try again later."""


class Refused(Exception):
    """The service answered 4xx: this request will never succeed as it is."""

    def __init__(self, status: int, message: str):
        super().__init__(f"{status}: {message}")
        self.status, self.message = status, message


class FleetClient:
    """One robot's authenticated connection to the fleet service (`learner.fleet.service`)."""

    def __init__(self, url: str, token: str, timeout: float = 10.0):
        self.url, self.timeout = url.rstrip("/"), timeout
        self._auth = {"Authorization": f"Bearer {token}"}

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[bytes, dict]:
        """(body, headers) of a 2xx answer; Refused on 4xx, ServiceUnavailable on anything else."""
        headers = dict(self._auth, **({"Content-Type": MSGPACK} if body is not None else {}))
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as response:
                return response.read(), dict(response.headers)
        except urllib.error.HTTPError as err:
            text = err.read().decode(errors="replace")
            if 400 <= err.code < 500 and err.code != 429:
                try:
                    text = json.loads(text)["error"]
                except (ValueError, KeyError, TypeError):
                    pass
                raise Refused(err.code, text) from None
            raise ServiceUnavailable(f"{method} {path}: HTTP {err.code}") from None
        except (OSError, http.client.HTTPException) as err:  # refused, reset, timeout, DNS, truncated
            raise ServiceUnavailable(f"{method} {path}: {err}") from None

    def push(self, body: bytes) -> dict:
        """Pushes an episodes body (`wire.episodes_body`); the service's {"stored", "duplicates"}."""
        return json.loads(self.request("POST", "/v1/episodes", body)[0])

    def manifest(self) -> dict:
        """The latest published params' manifest. While nothing is published: Refused with status 404,
        whose message is the service's reason (no learner yet, or `jaxvla publish` not run)."""
        return json.loads(self.request("GET", "/v1/params/manifest")[0])

    def params(self, version: int) -> bytes:
        return self.request("GET", f"/v1/params/{int(version)}")[0]

    def heartbeat(self, status: dict) -> dict:
        """Reports `status`; the service answers {"latest_version", "server_time", "robot_id"}: the robot
        its token belongs to (absent from services older than that field)."""
        return json.loads(self.request("POST", "/v1/heartbeat", wire.packb(status))[0])


class Backoff:
    """Exponential backoff with jitter: base * 2^failures, capped, times a random factor in [0.5, 1]."""

    def __init__(self, base: float = 0.25, cap: float = 30.0, seed: int | None = None):
        self.base, self.cap, self.failures = base, cap, 0
        self._rng = random.Random(seed)

    def next_delay(self) -> float:
        delay = min(self.cap, self.base * 2**self.failures) * self._rng.uniform(0.5, 1.0)
        self.failures = min(self.failures + 1, 30)  # 2**30 * base is far past any cap
        return delay

    def reset(self) -> None:
        self.failures = 0


class SpoolFull(Exception):
    """The spool holds `max_episodes` files; wait for the uploader before recording more."""


class Spool:
    """Episode bodies waiting for the service, one file each, named so that names sort oldest first."""

    def __init__(self, folder: str | os.PathLike, max_episodes: int = 1_000):
        self.folder = pathlib.Path(folder)
        self.rejected = self.folder / "rejected"
        self.rejected.mkdir(parents=True, exist_ok=True)
        self.max_episodes = max_episodes
        self._counter = 0
        self.added = threading.Event()

    def files(self) -> list[pathlib.Path]:
        return sorted(self.folder.glob("*.msgpack"))

    def __len__(self) -> int:
        return len(self.files())

    def put(self, episode_id: str, body: bytes) -> pathlib.Path:
        """Writes one episode's push body durably; SpoolFull if `max_episodes` are waiting."""
        if len(self) >= self.max_episodes:
            raise SpoolFull(
                f"{self.folder} holds {self.max_episodes} episodes; the service is not taking them"
            )
        self._counter += 1
        path = self.folder / f"{time.time_ns():020d}-{self._counter:06d}-{episode_id}.msgpack"
        fileformat.write_atomic(path, body)
        self.added.set()
        return path

    def reject(self, path: pathlib.Path, reason: str) -> None:
        """Sets a refused episode aside (kept for inspection, never retried)."""
        (self.rejected / f"{path.name}.reason").write_text(reason)
        path.rename(self.rejected / path.name)


class Uploader(threading.Thread):
    """Drains a spool into the service in the background; counts what it did in `stats`."""

    def __init__(self, client: FleetClient, spool: Spool, backoff: Backoff | None = None):
        super().__init__(name="fleet-uploader", daemon=True)
        self.client, self.spool, self.backoff = client, spool, backoff or Backoff()
        self.stop_event = threading.Event()
        self.stats = {"pushed": 0, "duplicates": 0, "rejected": 0, "failures": 0}
        self.last_error: str | None = None
        self.last_rejection: str | None = None

    def stop(self, drain_timeout: float = 0.0) -> None:
        """Stops after the spool is empty or `drain_timeout` seconds, whichever comes first."""
        deadline = time.monotonic() + drain_timeout
        while len(self.spool) and time.monotonic() < deadline and self.is_alive():
            time.sleep(0.05)
        self.stop_event.set()
        self.spool.added.set()
        self.join()

    def run(self) -> None:
        while not self.stop_event.is_set():
            files = self.spool.files()
            if not files:
                self.spool.added.wait(1.0)
                self.spool.added.clear()
                continue
            if not self.push_one(files[0]):
                self.stop_event.wait(self.backoff.next_delay())

    def push_one(self, path: pathlib.Path) -> bool:
        """True if the file left the spool (stored or refused), False if the service was unavailable."""
        try:
            answer = self.client.push(path.read_bytes())
        except ServiceUnavailable as err:
            self.stats["failures"] += 1
            self.last_error = str(err)
            return False
        except Refused as err:
            self.spool.reject(path, str(err))
            self.stats["rejected"] += 1
            self.last_error = self.last_rejection = str(err)
            # An error-level line: with no logging configured, Python still prints it on stderr.
            LOG.error("the service refused %s (%s); kept in %s", path.name, err, self.spool.rejected)
            return True
        self.stats["pushed"] += len(answer["stored"])
        self.stats["duplicates"] += len(answer["duplicates"])
        path.unlink()
        self.backoff.reset()
        return True


class ParamsPuller(threading.Thread):
    """Keeps `policy` at the newest published params that verify; never replaces it with a bad file."""

    def __init__(
        self,
        client: FleetClient,
        cache: str | os.PathLike,
        poll_s: float = 2.0,
        backoff: Backoff | None = None,
    ):
        super().__init__(name="fleet-params", daemon=True)
        self.client, self.cache, self.poll_s = client, pathlib.Path(cache), poll_s
        self.backoff = backoff or Backoff()
        self.stop_event = threading.Event()
        self.swapped = threading.Event()
        self.policy: actor_policy.Policy | None = None
        self.stats = {"pulls": 0, "rejected": 0, "failures": 0, "pull_bytes": 0, "pull_s": 0.0}
        self.last_error: str | None = None
        if self.cache.exists():
            try:
                self.policy = actor_policy.load(self.cache)
            except (OSError, fileformat.PolicyFileError) as err:
                self.last_error = f"cached params unusable: {err}"

    @property
    def version(self) -> int | None:
        policy = self.policy
        return None if policy is None else policy.version

    def stop(self) -> None:
        self.stop_event.set()
        self.join()

    def run(self) -> None:
        while not self.stop_event.is_set():
            ok = self.pull_once()
            self.stop_event.wait(self.poll_s if ok else self.backoff.next_delay())

    def pull_once(self) -> bool:
        """One manifest check and, if newer params exist, one verified swap. False on any failure; nothing
        published yet is not one (True, with the service's reason in `last_error`)."""
        try:
            manifest = self.client.manifest()
            if self.version is not None and manifest["version"] <= self.version:
                self.backoff.reset()
                return True
            tic = time.perf_counter()
            data = self.client.params(manifest["version"])
            self.stats["pull_s"] += time.perf_counter() - tic
            self.stats["pull_bytes"] += len(data)
        except Refused as err:
            if err.status != 404:
                self.stats["failures"] += 1
            self.last_error = str(err)  # 404: nothing published yet, and the service says why
            return err.status == 404
        except (ServiceUnavailable, KeyError, ValueError) as err:
            self.stats["failures"] += 1
            self.last_error = str(err)
            return False
        try:
            policy = verified_policy(data, manifest)
        except fileformat.PolicyFileError as err:
            self.stats["rejected"] += 1
            self.last_error = f"params v{manifest['version']} rejected, keeping v{self.version}: {err}"
            return False
        fileformat.write_atomic(self.cache, data)
        self.policy = policy  # one reference assignment: the control loop sees the old or the new policy
        self.stats["pulls"] += 1
        self.swapped.set()
        self.backoff.reset()
        return True


def verified_policy(data: bytes, manifest: dict) -> actor_policy.Policy:
    """The policy in `data` if its sha256 and version match the manifest and its own checksums hold."""
    digest = hashlib.sha256(data).hexdigest()
    if digest != manifest.get("file_sha256"):
        expected = str(manifest.get("file_sha256"))[:16]
        raise fileformat.PolicyFileError(
            f"file sha256 {digest[:16]}… does not match the manifest's {expected}…"
        )
    policy = actor_policy.loads(data)
    if policy.version != manifest["version"] or policy.metadata["sha256"] != manifest.get("sha256"):
        raise fileformat.PolicyFileError(
            f"file holds version {policy.version}, manifest says {manifest['version']}"
        )
    return policy
