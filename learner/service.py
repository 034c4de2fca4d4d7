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
    POST /v1/episodes/<id>/label           {"operator_reward": float, "success": bool?} -> 200
    GET  /v1/robots                        -> last heartbeat of every robot
    GET  /  or /v1/policy  (websocket)     openpi protocol: metadata on connect, then msgpack `infer`
    GET  /healthz                          -> "ok", no token

Status codes: 400 unreadable body (not msgpack, bad array encoding), 401 unknown or missing token
(nothing is stored), 403 an episode's robot_id is not the token's robot, 404 unknown version or episode,
413 body over `max_body_bytes`, 415 body not msgpack, 422 readable but invalid (schema, shapes, dtypes,
non-finite values, too many episodes or steps; the message names the field).

Nothing here runs jax. Disk I/O, decoding, validation and inference run in a thread pool, never on the
event loop, so a large push or a slow disk never stalls heartbeats or other robots.
"""

import asyncio
import concurrent.futures
import functools
import hmac
import json
import pathlib
import time

import numpy as np
from aiohttp import WSMsgType
from aiohttp import web

from jaxvla import episodes as rlds
from jaxvla.actor import policy as actor_policy
from jaxvla.actor import wire
from learner.store import EpisodeStore
from learner.store import ParamsRegistry

ROBOT_ID = web.RequestKey("robot_id", str)
MSGPACK_TYPES = ("application/msgpack", "application/x-msgpack", "application/octet-stream")


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
    if scheme not in ("Bearer", "Api-Key") or not token:
        return None
    # Compare against every token in constant time, so timing does not reveal a token's prefix.
    matches = [
        robot for known, robot in tokens.items() if hmac.compare_digest(known.encode(), token.encode())
    ]
    return matches[0] if matches else None


# ----------------------------------------------------------------------------------------- validation
def _check_finite(where: str, tree) -> None:
    for name, value in tree.items():
        if isinstance(value, dict):
            _check_finite(f"{where}/{name}", value)
        elif isinstance(value, np.ndarray) and value.dtype.kind == "f" and not np.all(np.isfinite(value)):
            raise Rejected(422, f"{where}/{name} has non-finite values (NaN or inf)")


def validate_push(body: bytes, robot_id: str, *, max_body_bytes: int, max_episodes: int,
                  max_steps: int) -> list[dict]:  # fmt: skip
    """The episodes of a push body, each checked against the RLDS schema; Rejected naming the problem."""
    try:
        message = wire.unpackb(body, max_bytes=max_body_bytes)
    except wire.WireError as err:
        raise Rejected(400, f"body: {err}") from None
    if not isinstance(message, dict) or "episodes" not in message:
        raise Rejected(422, 'body must be a map {"protocol": 1, "episodes": [...]}')
    if message.get("protocol") != wire.PROTOCOL_VERSION:
        raise Rejected(422, f"protocol {message.get('protocol')!r} is not supported; this service speaks "
                            f"{wire.PROTOCOL_VERSION}")  # fmt: skip
    episodes = message["episodes"]
    if not isinstance(episodes, list) or not 1 <= len(episodes) <= max_episodes:
        count = len(episodes) if isinstance(episodes, list) else type(episodes).__name__
        raise Rejected(422, f"episodes must be a list of 1 to {max_episodes} episodes, got {count}")
    seen = set()
    for i, episode in enumerate(episodes):
        try:
            length = rlds.check_episode(episode)
        except (ValueError, TypeError) as err:
            raise Rejected(422, f"episode {i}: {err}") from None
        if length > max_steps:
            raise Rejected(422, f"episode {i}: {length} steps, over the limit of {max_steps}")
        _check_finite(f"episode {i}: steps", episode["steps"])
        metadata = episode["episode_metadata"]
        for name in ("operator_reward", "cycle_time"):
            if not np.isfinite(metadata[name]):
                raise Rejected(422, f"episode {i}: episode_metadata/{name} is not finite")
        if metadata["robot_id"] != robot_id:
            raise Rejected(403, f"episode {i}: robot_id {metadata['robot_id']!r} is not this token's robot "
                                f"{robot_id!r}")  # fmt: skip
        if metadata["episode_id"] in seen:
            raise Rejected(422, f"episode {i}: episode_id {metadata['episode_id']} appears twice in the push")
        seen.add(metadata["episode_id"])
    return episodes


def _fields(body: bytes, required: dict[str, tuple[type, ...]], max_bytes: int = 65_536) -> dict:
    """A small msgpack map body with the `required` fields of the given types."""
    try:
        message = wire.unpackb(body, max_bytes=max_bytes)
    except wire.WireError as err:
        raise Rejected(400, f"body: {err}") from None
    if not isinstance(message, dict):
        raise Rejected(422, "body must be a msgpack map")
    for name, types in required.items():
        value = message.get(name)
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise Rejected(422, f"field {name!r} must be {' or '.join(t.__name__ for t in types)}")
    return message


# -------------------------------------------------------------------------------------------- service
class Service:
    """The aiohttp application over an episode store and a params registry (`app`)."""

    def __init__(self, store: EpisodeStore, registry: ParamsRegistry, tokens: dict[str, str], *,
                 max_body_bytes: int = 64 << 20, max_episodes: int = 64, max_steps: int = 2_000,
                 compact_every: int = 256, workers: int = 4):  # fmt: skip
        self.store, self.registry, self.tokens = store, registry, tokens
        self.limits = {"max_body_bytes": max_body_bytes, "max_episodes": max_episodes, "max_steps": max_steps}
        self.compact_every = compact_every
        self.robots: dict[str, dict] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="fleet-io")
        self._compaction: asyncio.Task | None = None
        self._policy: tuple[int, actor_policy.Policy] | None = None
        self.app = web.Application(client_max_size=max_body_bytes, middlewares=[self._errors, self._auth])
        self.app.add_routes([
            web.get("/healthz", self.health),
            web.post("/v1/episodes", self.push),
            web.get("/v1/params/manifest", self.manifest),
            web.get("/v1/params/{version}", self.params),
            web.post("/v1/heartbeat", self.heartbeat),
            web.post("/v1/episodes/{episode_id}/label", self.label),
            web.get("/v1/robots", self.robot_table),
            web.get("/", self.policy_socket),
            web.get("/v1/policy", self.policy_socket),
        ])  # fmt: skip
        self.app.on_cleanup.append(self._close)

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args))

    async def _close(self, _app) -> None:
        if self._compaction is not None:
            await self._compaction
        self._pool.shutdown(wait=True)

    @web.middleware
    async def _errors(self, request: web.Request, handler):
        try:
            return await handler(request)
        except Rejected as err:
            return web.json_response({"error": err.message}, status=err.status)
        except web.HTTPRequestEntityTooLarge:
            limit = self.limits["max_body_bytes"]
            return web.json_response({"error": f"body is over the limit of {limit} bytes"}, status=413)

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
        if request.content_type not in MSGPACK_TYPES:
            raise Rejected(415, f"body must be msgpack (Content-Type application/msgpack), got "
                                f"{request.content_type!r}")  # fmt: skip
        if (request.content_length or 0) > self.limits["max_body_bytes"]:
            raise Rejected(413, f"body is {request.content_length} bytes, over the limit of "
                                f"{self.limits['max_body_bytes']}")  # fmt: skip
        return await request.read()

    # ------------------------------------------------------------------------------------- handlers
    async def health(self, _request: web.Request) -> web.Response:
        return web.Response(text="ok")

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
        if self.compact_every <= 0 or (self._compaction is not None and not self._compaction.done()):
            return
        self._compaction = asyncio.get_running_loop().create_task(
            self._run(self.store.compact, self.compact_every)
        )

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
        text = request.match_info["version"]
        if not text.isdigit():
            raise Rejected(400, f"params version must be a non-negative integer, got {text!r}")
        data = await self._run(self.registry.read, int(text))
        if data is None:
            raise Rejected(404, f"params version {text} was never published")
        entry = self.registry.entry(int(text))
        headers = {"X-Params-Version": text, "X-Params-Sha256": entry["file_sha256"]}
        return web.Response(body=data, content_type="application/octet-stream", headers=headers)

    async def heartbeat(self, request: web.Request) -> web.Response:
        message = _fields(await self._body(request), {})
        status = {k: v for k, v in message.items() if isinstance(v, int | float | str | bool | None)}
        self.robots[request[ROBOT_ID]] = {**status, "last_seen": time.time()}
        latest = self.registry.latest()
        return web.json_response({"latest_version": latest and latest["version"], "server_time": time.time(),
                                  "robot_id": request[ROBOT_ID]})  # fmt: skip

    async def label(self, request: web.Request) -> web.Response:
        message = _fields(await self._body(request), {"operator_reward": (float, int)})
        success = message.get("success")
        if success is not None and not isinstance(success, bool):
            raise Rejected(422, "field 'success' must be a bool when given")
        if not np.isfinite(message["operator_reward"]):
            raise Rejected(422, "field 'operator_reward' must be finite")
        episode_id = request.match_info["episode_id"]
        known = await self._run(self.store.label, episode_id, message["operator_reward"], success)
        if not known:
            raise Rejected(404, f"no stored episode {episode_id}")
        return web.json_response({"labelled": episode_id})

    async def robot_table(self, _request: web.Request) -> web.Response:
        return web.json_response(self.robots)

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
                tic = time.perf_counter()
                out = await self._run(policy.infer, obs)
                reply = {**out, "policy_version": policy.version,
                         "server_timing": {"infer_ms": 1e3 * (time.perf_counter() - tic)}}  # fmt: skip
                await socket.send_bytes(wire.packb(reply))
            except (wire.WireError, KeyError, ValueError, TypeError, Rejected) as err:
                # openpi clients raise on a text reply; the connection stays open for the next request.
                await socket.send_str(f"infer failed: {err}")
        return socket


def serve(service: Service, host: str, port: int) -> None:
    """Runs the service until interrupted (SIGINT / SIGTERM)."""
    web.run_app(service.app, host=host, port=port, print=None, handle_signals=True)
