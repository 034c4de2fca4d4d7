"""The fleet service: robots push episodes and pull params over HTTP; remote-inference robots use a websocket.

Endpoints (every one but /healthz needs `Authorization: Bearer <token>`; openpi's `Api-Key <token>` is
accepted too). Request bodies are msgpack (`jaxvla.actor.wire`, arrays as dtype + shape + bytes, never
pickle); responses are JSON, errors `{"error": "<what is wrong>"}`.

    POST /v1/episodes                      {"protocol": 1, "episodes": [episode, ...]}  -> 200
         {"stored": [ids], "duplicates": [ids]}. Idempotent by episode_id: a repeated push stores nothing
         and answers 200 again. 200 means every episode is on disk (fsynced). All or nothing: one bad
         episode rejects the push.
    GET  /v1/params/manifest               -> the latest published version: version, parent_version,
                                              sha256 (weights), file_sha256, bytes, gate, url
    GET  /v1/params/<version>              -> the exported policy file (application/octet-stream)
    POST /v1/heartbeat                     {"policy_version", "spool_episodes", ...} -> {"latest_version",
                                              "server_time", "robot_id" (the token's robot)}
    POST /v1/episodes/<id>/label           {"operator_reward": float, "success": bool?} -> 200, the
                                              token's own episodes only
    GET  /v1/robots                        -> last heartbeat of every robot
    GET  /  or /v1/policy  (websocket)     openpi protocol: metadata on connect, then msgpack `infer`
    GET  /healthz                          -> {"status": "ok", "episodes", "compaction_backlog",
                                              "quarantined", "compacting"}, no token

Status codes: 400 unreadable body (not msgpack, bad array encoding) or params version, 401 unknown or
missing token (nothing is stored), 403 an episode's robot_id is not the token's robot, 404 unknown
version, episode or route, 405 wrong method, 413 body over `max_body_bytes`, 415 body not msgpack (or no
Content-Type), 422 readable but invalid (schema, shapes, dtypes, non-finite or out-of-range values,
non-canonical UUIDs, too many episodes or steps; the message names the field). Every error is JSON.

Validation is `jaxvla.episodes.canonical_episode`: what it accepts, the store writes into RLDS and reads
back, so one accepted episode can never stop compaction (and an episode in the store that the RLDS
writer's check refuses, one an older service accepted, is quarantined while the others go on). The
fleet page (`page_app`, `learner.fleet.page`) is a separate read-only listener, bound to loopback by
default, with no token.

Nothing here runs jax. Disk I/O, decoding, validation and inference run in a thread pool, never on the
event loop, so a large push or a slow disk never stalls heartbeats or other robots.
"""

import asyncio
import concurrent.futures
import functools
import hmac
import json
import logging
import math
import pathlib
import re
import signal
import threading
import time

import numpy as np
from aiohttp import WSMsgType
from aiohttp import web

from jaxvla import episodes as rlds
from jaxvla.actor import policy as actor_policy
from jaxvla.actor import wire
from learner.fleet.store import CompactionStopped
from learner.fleet.store import EpisodeStore
from learner.fleet.store import ParamsRegistry

ROBOT_ID = web.RequestKey("robot_id", str)
MSGPACK_TYPES = ("application/msgpack", "application/x-msgpack", "application/octet-stream")
log = logging.getLogger(__name__)


class Rejected(Exception):
    """A request the service refuses, with its HTTP status and the message that names the problem."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def load_tokens(path: str | pathlib.Path) -> dict[str, str]:
    """{token: robot_id} from a JSON file mapping robot_id -> token (one token per robot)."""
    by_robot = json.loads(pathlib.Path(path).read_text())
    tokens = {token: robot for robot, token in by_robot.items()}
    if len(tokens) != len(by_robot) or any(len(t) < 16 for t in tokens):
        raise ValueError(f"{path}: every robot needs its own token of at least 16 characters")
    return tokens


def robot_of(header: str, tokens: dict[str, str]) -> str | None:
    """The robot a `Bearer <token>` (or openpi's `Api-Key <token>`) header belongs to, or None."""
    scheme, _, token = header.partition(" ")
    if scheme.lower() not in ("bearer", "api-key") or not token:  # schemes are case-insensitive (RFC 9110)
        return None
    # Compare against every token in constant time, so timing does not reveal a token's prefix.
    matches = [
        robot for known, robot in tokens.items() if hmac.compare_digest(known.encode(), token.encode())
    ]
    return matches[0] if matches else None


# ----------------------------------------------------------------------------------------- validation
def validate_push(
    body: bytes, robot_id: str, *, max_body_bytes: int, max_episodes: int, max_steps: int
) -> list[dict]:
    """The episodes of a push body in canonical form (`rlds.canonical_episode`: what the store writes back
    and reads again), each checked against the RLDS schema; Rejected naming the problem."""
    try:
        message = wire.unpackb(body, max_bytes=max_body_bytes)
    except wire.WireError as err:
        raise Rejected(400, f"body: {err}") from None
    if not isinstance(message, dict) or "episodes" not in message:
        raise Rejected(422, 'body must be a map {"protocol": 1, "episodes": [...]}')
    if message.get("protocol") != wire.PROTOCOL_VERSION:
        raise Rejected(
            422,
            f"protocol {message.get('protocol')!r} is not supported; this service speaks "
            f"{wire.PROTOCOL_VERSION}",
        )
    episodes = message["episodes"]
    if not isinstance(episodes, list) or not 1 <= len(episodes) <= max_episodes:
        count = len(episodes) if isinstance(episodes, list) else type(episodes).__name__
        raise Rejected(422, f"episodes must be a list of 1 to {max_episodes} episodes, got {count}")
    seen, canonical = set(), []
    for i, episode in enumerate(episodes):
        try:
            episode = rlds.canonical_episode(episode)
        except (ValueError, TypeError) as err:
            raise Rejected(422, f"episode {i}: {err}") from None
        length = len(episode["steps"]["is_first"])
        if length > max_steps:
            raise Rejected(422, f"episode {i}: {length} steps, over the limit of {max_steps}")
        metadata = episode["episode_metadata"]
        if metadata["robot_id"] != robot_id:
            raise Rejected(
                403, f"episode {i}: robot_id {metadata['robot_id']!r} is not this token's robot {robot_id!r}"
            )
        if metadata["episode_id"] in seen:
            raise Rejected(422, f"episode {i}: episode_id {metadata['episode_id']} appears twice in the push")
        seen.add(metadata["episode_id"])
        canonical.append(episode)
    return canonical


HEARTBEAT_FIELDS = 32
HEARTBEAT_TEXT = 256


def validate_heartbeat(message) -> dict:
    """A heartbeat's status as it is stored and served back as JSON: at most HEARTBEAT_FIELDS text keys
    with null, bool, int64, finite float or short text values; `policy_version` an int or null and
    `spool_episodes` a non-negative int when present. Rejected (422) naming the field otherwise."""
    if not isinstance(message, dict) or len(message) > HEARTBEAT_FIELDS:
        raise Rejected(422, f"heartbeat must be a map of at most {HEARTBEAT_FIELDS} fields")
    for key, value in message.items():
        if not isinstance(key, str) or not 0 < len(key) <= 64:
            raise Rejected(422, f"heartbeat field name {key!r} must be text of 1 to 64 characters")
        if not _plain_status_value(value):
            raise Rejected(
                422,
                f"heartbeat field {key!r} = {value!r} must be null, a bool, an int64, a "
                f"finite float or text of at most {HEARTBEAT_TEXT} characters",
            )
    version, spool = message.get("policy_version"), message.get("spool_episodes", 0)
    if version is not None and (isinstance(version, bool) or not isinstance(version, int)):
        raise Rejected(422, f"heartbeat field 'policy_version' = {version!r} must be an int or null")
    if isinstance(spool, bool) or not isinstance(spool, int) or spool < 0:
        raise Rejected(422, f"heartbeat field 'spool_episodes' = {spool!r} must be a non-negative int")
    return dict(message)


def _plain_status_value(value) -> bool:
    if value is None or isinstance(value, bool):
        return True
    if isinstance(value, int):
        return -(2**63) <= value < 2**63
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, str) and len(value) <= HEARTBEAT_TEXT


def check_observation(obs, max_batch: int) -> None:
    """Rejected unless `obs` is a map whose float arrays are finite and whose batch is at most
    `max_batch`: a NaN observation would come back as NaN actions a robot might execute."""
    if not isinstance(obs, dict):
        raise Rejected(422, "an observation must be a msgpack map")
    for key, value in obs.items():
        if _has_non_finite(value):
            raise Rejected(422, f"observation {key!r} has non-finite values (NaN or inf)")
    prompt = obs.get("prompt")
    if isinstance(prompt, np.ndarray) and prompt.ndim == 2 and prompt.shape[0] > max_batch:
        raise Rejected(422, f"observation batch of {prompt.shape[0]} is over the limit of {max_batch}")


def _has_non_finite(value) -> bool:
    """NaN or inf anywhere in an array, a float, or lists and maps of them (openpi may send lists)."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, list | tuple):
        return any(_has_non_finite(v) for v in value)
    if isinstance(value, dict):
        return any(_has_non_finite(v) for v in value.values())
    return isinstance(value, np.ndarray) and value.dtype.kind == "f" and not np.all(np.isfinite(value))


def params_version(text: str) -> int:
    """The version in `/v1/params/<version>`: ASCII digits only (str.isdigit also takes '²' and fullwidth
    digits), at most 18 of them."""
    if not re.fullmatch(r"[0-9]{1,18}", text):
        raise Rejected(400, f"params version must be a non-negative integer in ASCII digits, got {text!r}")
    return int(text)


def _fields(body: bytes, required: dict[str, tuple[type, ...]]) -> dict:
    """A small msgpack map body with the `required` fields of the given types."""
    message = wire_message(body)
    if not isinstance(message, dict):
        raise Rejected(422, "body must be a msgpack map")
    for name, types in required.items():
        value = message.get(name)
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise Rejected(422, f"field {name!r} must be {' or '.join(t.__name__ for t in types)}")
    return message


# -------------------------------------------------------------------------------------------- service
class Service:
    """The aiohttp application over an episode store and a params registry (`app`), and the read-only
    fleet page (`page_app`), served on its own listener."""

    def __init__(
        self,
        store: EpisodeStore,
        registry: ParamsRegistry,
        tokens: dict[str, str],
        *,
        max_body_bytes: int = 64 << 20,
        max_episodes: int = 64,
        max_steps: int = 2_000,
        compact_every: int = 256,
        part_episodes: int = 256,
        max_infer_batch: int = 256,
        workers: int = 4,
    ):
        self.store, self.registry, self.tokens = store, registry, tokens
        self.limits = {"max_body_bytes": max_body_bytes, "max_episodes": max_episodes, "max_steps": max_steps}
        self.compact_every, self.part_episodes, self.max_infer_batch = (
            compact_every,
            part_episodes,
            max_infer_batch,
        )
        self.robots: dict[str, dict] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="fleet-io")
        self._compaction: asyncio.Task | None = None
        self._stopping = threading.Event()  # set on shutdown: compaction stops between two episodes
        self._policy: tuple[int, actor_policy.Policy] | None = None
        self.app = web.Application(client_max_size=max_body_bytes, middlewares=[self._errors, self._auth])
        self.app.add_routes(
            [
                web.get("/healthz", self.health),
                web.post("/v1/episodes", self.push),
                web.get("/v1/params/manifest", self.manifest),
                web.get("/v1/params/{version}", self.params),
                web.post("/v1/heartbeat", self.heartbeat),
                web.post("/v1/episodes/{episode_id}/label", self.label),
                web.get("/v1/robots", self.robot_table),
                web.get("/", self.policy_socket),
                web.get("/v1/policy", self.policy_socket),
            ]
        )
        self.app.on_shutdown.append(self._stop_compaction)
        self.app.on_cleanup.append(self._close)
        self.page_app = web.Application(middlewares=[self._errors])
        self.page_app.add_routes([web.get("/", self.page)])

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args))

    async def _stop_compaction(self, _app) -> None:
        self._stopping.set()

    async def _close(self, _app) -> None:
        self._stopping.set()
        if self._compaction is not None:
            await self._compaction  # returns once the episode being encoded is done
        self._pool.shutdown(wait=True)

    @web.middleware
    async def _errors(self, request: web.Request, handler):
        """Every error is JSON {"error": ...}: refusals, aiohttp's own 404 / 405 / 413, and crashes."""
        try:
            return await handler(request)
        except Rejected as err:
            return web.json_response({"error": err.message}, status=err.status)
        except web.HTTPRequestEntityTooLarge:
            limit = self.limits["max_body_bytes"]
            return web.json_response({"error": f"body is over the limit of {limit} bytes"}, status=413)
        except web.HTTPException as err:
            if err.status < 400:
                raise
            headers = {k: v for k, v in err.headers.items() if k in ("Allow",)}
            message = f"{request.method} {request.path}: {err.reason}"
            return web.json_response({"error": message}, status=err.status, headers=headers)
        except Exception:
            log.exception("%s %s failed", request.method, request.path)
            return web.json_response({"error": "internal error; the service logged it"}, status=500)

    @web.middleware
    async def _auth(self, request: web.Request, handler):
        if request.path == "/healthz":
            return await handler(request)
        robot = robot_of(request.headers.get("Authorization", ""), self.tokens)
        if robot is None:
            raise Rejected(401, "missing or unknown token; send 'Authorization: Bearer <robot token>'")
        request[ROBOT_ID] = robot
        return await handler(request)

    async def _body(self, request: web.Request) -> bytes:
        # Read the header itself: aiohttp reports a missing or empty one as application/octet-stream.
        sent = request.headers.get("Content-Type", "")
        if sent.partition(";")[0].strip().lower() not in MSGPACK_TYPES:
            raise Rejected(415, f"body must be msgpack (Content-Type application/msgpack), got {sent!r}")
        if (request.content_length or 0) > self.limits["max_body_bytes"]:
            raise Rejected(
                413,
                f"body is {request.content_length} bytes, over the limit of {self.limits['max_body_bytes']}",
            )
        return await request.read()

    # ------------------------------------------------------------------------------------- handlers
    async def health(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", **self.store_status()})

    def store_status(self) -> dict:
        """The episode store at a glance: the compaction backlog is what a monitor should watch."""
        compacting = self._compaction is not None and not self._compaction.done()
        return {
            "episodes": len(self.store),
            "compaction_backlog": self.store.backlog,
            "quarantined": self.store.quarantined,
            "compacting": compacting,
        }

    async def push(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        episodes = await self._run(functools.partial(validate_push, **self.limits), body, request[ROBOT_ID])
        stored, duplicates = [], []
        for episode in episodes:
            _, created = await self._run(self.store.commit, episode)
            (stored if created else duplicates).append(episode["episode_metadata"]["episode_id"])
        self._maybe_compact()
        return web.json_response({"stored": stored, "duplicates": duplicates, "episodes": len(self.store)})

    def _maybe_compact(self) -> None:
        """Starts one background compaction at a time once `compact_every` episodes wait in incoming/."""
        busy = self._compaction is not None and not self._compaction.done()
        if self.compact_every <= 0 or busy or self.store.backlog < self.compact_every:
            return
        self._compaction = asyncio.get_running_loop().create_task(self._run(self._compact_backlog))

    def _compact_backlog(self) -> None:
        """Parts of at most `part_episodes` until fewer than `compact_every` wait, or shutdown begins."""
        while not self._stopping.is_set() and self.store.backlog >= self.compact_every:
            try:
                self.store.compact(self.compact_every, self.part_episodes, self._stopping)
            except CompactionStopped:
                return
            except Exception:
                # Not an episode's fault (those are quarantined): the disk, say. Retried on the next push.
                log.exception("compaction failed; the episodes stay in incoming/")
                return

    async def manifest(self, _request: web.Request) -> web.Response:
        latest = await self._run(self.registry.latest)
        if latest is None:
            raise Rejected(
                404,
                "no params published yet: the learner publishes its first version when it starts; "
                "without a learner, publish a file with `jaxvla publish FILE`",
            )
        return web.json_response({**latest, "url": f"/v1/params/{latest['version']}"})

    async def params(self, request: web.Request) -> web.Response:
        version = params_version(request.match_info["version"])
        data = await self._run(self.registry.read, version)
        if data is None:
            raise Rejected(404, f"params version {version} was never published")
        entry = self.registry.entry(version)
        headers = {"X-Params-Version": str(version), "X-Params-Sha256": entry["file_sha256"]}
        return web.Response(body=data, content_type="application/octet-stream", headers=headers)

    async def heartbeat(self, request: web.Request) -> web.Response:
        message = wire_message(await self._body(request))
        self.robots[request[ROBOT_ID]] = {**validate_heartbeat(message), "last_seen": time.time()}
        latest = self.registry.latest()
        return web.json_response(
            {
                "latest_version": latest and latest["version"],
                "server_time": time.time(),
                "robot_id": request[ROBOT_ID],
            }
        )

    async def label(self, request: web.Request) -> web.Response:
        message = _fields(await self._body(request), {"operator_reward": (float, int)})
        success = message.get("success")
        if success is not None and not isinstance(success, bool):
            raise Rejected(422, "field 'success' must be a bool when given")
        reward = message["operator_reward"]
        try:
            rlds.canonical_uuid("episode id", request.match_info["episode_id"])
            bounds = rlds.METADATA_RANGES["operator_reward"]
            if not (math.isfinite(reward) and bounds[0] <= reward <= bounds[1]):
                raise ValueError(f"field 'operator_reward' = {reward!r} must be finite and fit a float32")
        except ValueError as err:
            raise Rejected(422, str(err)) from None
        episode_id = request.match_info["episode_id"]
        owner = await self._run(self.store.robot_of, episode_id)
        if owner is None:
            raise Rejected(404, f"no stored episode {episode_id}")
        if owner != request[ROBOT_ID]:
            raise Rejected(
                403, f"episode {episode_id} was not pushed by this token's robot {request[ROBOT_ID]!r}"
            )
        await self._run(self.store.label, episode_id, reward, success)
        return web.json_response({"labelled": episode_id})

    async def robot_table(self, _request: web.Request) -> web.Response:
        return web.json_response(self.robots)

    async def page(self, _request: web.Request) -> web.Response:
        """The read-only fleet page (`learner.fleet.page`)."""
        # matplotlib: imported only by a service whose page is opened
        from learner.fleet import page as fleet_page

        status, robots = self.store_status(), dict(self.robots)

        def render() -> str:  # reads the registry and the store's summaries: off the event loop
            return fleet_page.render(robots, self.registry.entries(), self.store.summaries(), status)

        html = await self._run(render)
        return web.Response(text=html, content_type="text/html", headers={"Cache-Control": "no-store"})

    # ----------------------------------------------------------------------------- remote inference
    async def _current_policy(self) -> actor_policy.Policy:
        latest = await self._run(self.registry.latest)
        if latest is None:
            raise Rejected(404, "no params published yet")
        if self._policy is None or self._policy[0] != latest["version"]:
            data = await self._run(self.registry.read, latest["version"])
            self._policy = (latest["version"], await self._run(actor_policy.loads, data))
        return self._policy[1]

    async def policy_socket(self, request: web.Request) -> web.StreamResponse:
        """openpi's websocket protocol: metadata first, then one msgpack action reply per observation."""
        policy = await self._current_policy()
        socket = web.WebSocketResponse(max_msg_size=self.limits["max_body_bytes"])
        await socket.prepare(request)
        spec = policy.metadata
        metadata = {
            "policy_version": policy.version,
            "action": spec["action"],
            "observation": spec["observation"],
        }
        await socket.send_bytes(wire.packb(metadata))
        async for message in socket:
            if message.type != WSMsgType.BINARY:
                await socket.send_str("send msgpack binary frames")
                continue
            try:
                policy = await self._current_policy()
                obs = await self._run(wire.unpackb, message.data)
                check_observation(obs, self.max_infer_batch)
                tic = time.perf_counter()
                out = await self._run(policy.infer, obs)
                reply = {
                    **out,
                    "policy_version": policy.version,
                    "server_timing": {"infer_ms": 1e3 * (time.perf_counter() - tic)},
                }
                await socket.send_bytes(wire.packb(reply))
            except (wire.WireError, KeyError, ValueError, TypeError, Rejected) as err:
                # openpi clients raise on a text reply; the connection stays open for the next request.
                await socket.send_str(f"infer failed: {err}")
        return socket


def wire_message(body: bytes, max_bytes: int = 65_536):
    """A small msgpack body, decoded; Rejected (400) if it does not decode."""
    try:
        return wire.unpackb(body, max_bytes=max_bytes)
    except wire.WireError as err:
        raise Rejected(400, f"body: {err}") from None


async def _serve_until_stopped(
    service: Service, host: str, port: int, page_host: str, page_port: int
) -> None:
    runners = [web.AppRunner(service.app, handle_signals=False)]
    if page_port:
        runners.append(web.AppRunner(service.page_app, handle_signals=False))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await runners[0].setup()
        await web.TCPSite(runners[0], host, port).start()
        if page_port:
            await runners[1].setup()
            try:
                await web.TCPSite(runners[1], page_host, page_port).start()
            except OSError as err:  # a busy page port must not take the robots' service down
                log.warning("the fleet page is not served on %s:%s: %s", page_host, page_port, err)
        await stop.wait()
    finally:
        for runner in reversed(runners):
            await runner.cleanup()  # on_shutdown stops compaction, on_cleanup waits for it


def serve(service: Service, host: str, port: int, page_host: str = "127.0.0.1", page_port: int = 0) -> None:
    """Runs the service (and the fleet page on `page_host:page_port`, unless 0) until SIGINT / SIGTERM."""
    asyncio.run(_serve_until_stopped(service, host, port, page_host, page_port))
