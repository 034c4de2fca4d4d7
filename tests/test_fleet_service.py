"""The fleet service over real HTTP on loopback (`jaxvla serve` processes), with the numpy client.

One service process per module (restarted once by the kill -9 test); the learner is off: params are
published into the registry directly, as the learner process would. Nothing here compiles anything.
"""

import asyncio
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import aiohttp
import jax
import msgpack
import numpy as np
import pytest
from aiohttp.test_utils import TestClient
from aiohttp.test_utils import TestServer
from conftest import REPO_ROOT
from flax import nnx
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from jaxvla import episodes as E
from jaxvla import export
from jaxvla import normalization
from jaxvla.actor import client as fleet
from jaxvla.actor import wire
from jaxvla.models import ModelConfig
from learner.fleet import service as service_module
from learner.fleet.store import EpisodeStore
from learner.fleet.store import ParamsRegistry

TOKENS = {"robot-0": "token-robot-0-0123456789", "robot-1": "token-robot-1-0123456789"}
MODEL = ModelConfig(width=16, prompt_dim=8, ensemble=2, value_bins=11)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def policy_file(version: int, parent: int | None, seed: int = 0) -> bytes:
    """A valid exported policy (tiny, untrained) as bytes."""
    _, params = nnx.split(MODEL.create_policy(seed), nnx.Param)
    obs = MODEL.fake_observation(jax.random.key(0), 64)
    stats = normalization.compute(jax.device_get(obs))
    target = pathlib.Path(tempfile.gettempdir()) / f"fleet-policy-{os.getpid()}-{version}-{seed}.msgpack"
    path = export.write(
        target, MODEL, params, stats, version=version, parent_version=parent, config_hash="test"
    )
    data = path.read_bytes()
    path.unlink()
    return data


class Server:
    """A `jaxvla serve --fleet.no-learner` process that can be killed and restarted on the same root."""

    def __init__(self, root: pathlib.Path, *extra: str):
        """`extra`: more `jaxvla serve` flags (they override the ones below)."""
        self.root, self.port, self.extra = root, free_port(), extra
        self.url = f"http://127.0.0.1:{self.port}"
        (root / "tokens.json").parent.mkdir(parents=True, exist_ok=True)
        (root / "tokens.json").write_text(json.dumps(TOKENS))
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        args = [
            *("debug", "--fleet.no-learner", "--fleet.root", str(self.root), "--fleet.port", str(self.port)),
            *("--fleet.tokens", str(self.root / "tokens.json"), "--fleet.compact-every", "8"),
            *("--fleet.max-body-mb", "4", "--fleet.max-steps", "300", "--fleet.page-port", "0"),
            *self.extra,
        ]
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
        command = [sys.executable, "-m", "jaxvla.cli", "serve", *args]
        self.process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(self.url + "/healthz", timeout=1).read()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("the service did not come up")

    def kill9(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("fleet"))
    srv.start()
    yield srv
    srv.stop()


def client(srv: Server, robot: str = "robot-0", timeout: float = 5.0) -> fleet.FleetClient:
    return fleet.FleetClient(srv.url, TOKENS[robot], timeout=timeout)


def episodes(n: int, robot: str = "robot-0", seed: int = 0, length: int = 20) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [E.random_episode(rng, length, robot_id=robot) for _ in range(n)]


def stored_ids(srv: Server) -> list[str]:
    return [
        ep["episode_metadata"]["episode_id"]
        for _, ep in EpisodeStore(srv.root / "store", writer=False).read_since(-1)
    ]


def raw_post(
    srv: Server, body: bytes, token: str | None, content_type: str = "application/msgpack"
) -> tuple[int, str]:
    headers = {"Content-Type": content_type, **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(srv.url + "/v1/episodes", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())["error"]


# ---------------------------------------------------------------------------------------- push
def test_push_is_durable_and_idempotent(server):
    batch = episodes(3, seed=1)
    body = wire.episodes_body(batch)
    ids = [ep["episode_metadata"]["episode_id"] for ep in batch]
    first = client(server).push(body)
    again = client(server).push(body)
    assert first["stored"] == ids and first["duplicates"] == []
    assert again["stored"] == [] and again["duplicates"] == ids
    assert stored_ids(server).count(ids[0]) == 1 and set(ids) <= set(stored_ids(server))
    # What the learner reads back is exactly what was pushed.
    read = dict(EpisodeStore(server.root / "store", writer=False).read_since(-1))
    got = next(ep for ep in read.values() if ep["episode_metadata"]["episode_id"] == ids[1])
    np.testing.assert_array_equal(
        got["steps"]["observation"]["proprio"], batch[1]["steps"]["observation"]["proprio"]
    )


def test_unknown_token_gets_401_and_nothing_is_stored(server):
    before = len(stored_ids(server))
    status, error = raw_post(server, wire.episodes_body(episodes(1, seed=2)), "not-a-token-0000000000")
    assert status == 401 and "token" in error
    status, _ = raw_post(server, wire.episodes_body(episodes(1, seed=2)), None)
    assert status == 401 and len(stored_ids(server)) == before


def test_another_robots_episode_is_refused(server):
    status, error = raw_post(
        server, wire.episodes_body(episodes(1, robot="robot-1", seed=3)), TOKENS["robot-0"]
    )
    assert status == 403 and "robot-1" in error


def malformed_bodies():
    """(what is wrong, body builder(rng) -> bytes, expected status, a word the error must contain)."""

    def with_episode(change):
        def build(seed):
            episode = episodes(1, seed=seed)[0]
            change(episode)
            return wire.episodes_body([episode])

        return build

    def set_step(name, value):
        return with_episode(lambda ep: ep["steps"].__setitem__(name, value(ep["steps"][name])))

    def set_obs(name, value):
        return with_episode(
            lambda ep: ep["steps"]["observation"].__setitem__(name, value(ep["steps"]["observation"][name]))
        )

    return {
        "not msgpack": (lambda seed: b"\xc1" + bytes([seed % 256]) * 10, 400, "msgpack"),
        "truncated msgpack": (lambda seed: wire.episodes_body(episodes(1, seed=seed))[:-7], 400, "msgpack"),
        "bad array bytes": (
            lambda seed: msgpack.packb(
                {
                    "protocol": 1,
                    "episodes": [
                        {"steps": {"__ndarray__": True, "data": b"abc", "dtype": "<f4", "shape": [2]}}
                    ],
                }
            ),
            400,
            "bytes",
        ),
        "object dtype": (
            lambda seed: msgpack.packb(
                {"protocol": 1, "episodes": [{"__ndarray__": True, "data": b"", "dtype": "|O", "shape": [0]}]}
            ),
            400,
            "dtype",
        ),
        "not a map": (lambda seed: msgpack.packb([1, 2, seed]), 422, "map"),
        "wrong protocol": (lambda seed: msgpack.packb({"protocol": 99, "episodes": []}), 422, "protocol"),
        "no episodes": (lambda seed: wire.packb({"protocol": 1, "episodes": []}), 422, "episodes"),
        "missing field": (with_episode(lambda ep: ep["steps"].pop("reward")), 422, "reward"),
        "missing metadata": (
            with_episode(lambda ep: ep["episode_metadata"].pop("episode_id")),
            422,
            "episode_id",
        ),
        "wrong dtype": (set_step("action", lambda a: a.astype(np.float64)), 422, "steps/action"),
        "wrong shape": (set_obs("proprio", lambda a: a[:, :5]), 422, "proprio"),
        "NaN": (
            set_step("reward", lambda r: np.where(np.arange(len(r)) == 1, np.nan, r).astype(np.float32)),
            422,
            "non-finite",
        ),
        "inf": (set_obs("telemetry", lambda a: np.full_like(a, np.inf)), 422, "non-finite"),
        "too many steps": (lambda seed: wire.episodes_body(episodes(1, seed=seed, length=301)), 422, "limit"),
        "oversized body": (
            lambda seed: wire.packb({"protocol": 1, "episodes": [], "pad": b"x" * (5 << 20)}),
            413,
            "limit",
        ),
    }


MALFORMED = malformed_bodies()


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    case=st.sampled_from(sorted(MALFORMED)),
    seed=st.integers(0, 2**16),
    token=st.sampled_from(["good", "bad", "none"]),
)
def test_fuzzed_pushes_get_a_clear_4xx_and_change_nothing(server, case, seed, token):
    build, status, word = MALFORMED[case]
    before = stored_ids(server)
    header = {"good": TOKENS["robot-0"], "bad": "wrong-token-000000000000", "none": None}[token]
    got, error = raw_post(server, build(seed), header)
    if token == "good":
        assert got == status and word in error, (case, got, error)
    else:
        assert got in (401, 413), (case, got, error)  # auth first; an oversized body may be refused before it
    assert json.loads(urllib.request.urlopen(server.url + "/healthz", timeout=5).read())["status"] == "ok"
    assert stored_ids(server) == before


def test_wrong_content_type_is_415(server):
    status, error = raw_post(server, b"{}", TOKENS["robot-0"], content_type="application/json")
    assert status == 415 and "msgpack" in error


# --------------------------------------------------------------------------------- reliability
def test_kill9_mid_stream_loses_and_duplicates_nothing_and_the_spool_drains(server, tmp_path):
    """An actor's uploader streams 24 episodes; the service is killed -9 mid-stream and restarted later.
    Every episode ends up stored exactly once; the actor's spool is empty."""
    batch = episodes(24, seed=7)
    spool = fleet.Spool(tmp_path / "spool")
    uploader = fleet.Uploader(client(server, timeout=2.0), spool, fleet.Backoff(base=0.05, cap=0.5, seed=0))
    for ep in batch[:12]:
        spool.put(ep["episode_metadata"]["episode_id"], wire.episodes_body([ep]))
    uploader.start()
    while len(spool) > 6:  # mid-stream: some pushed, some not
        time.sleep(0.01)
    server.kill9()
    for ep in batch[12:]:  # the robot keeps working while the service is down
        spool.put(ep["episode_metadata"]["episode_id"], wire.episodes_body([ep]))
    time.sleep(1.0)
    assert len(spool) >= 12 and uploader.stats["failures"] > 0
    server.start()
    uploader.stop(drain_timeout=60)
    assert len(spool) == 0 and uploader.stats["rejected"] == 0
    ids = stored_ids(server)
    assert len(ids) == len(set(ids)), "an episode was stored twice"
    assert {ep["episode_metadata"]["episode_id"] for ep in batch} <= set(ids), "an episode was lost"


def test_compaction_moves_episodes_into_rlds_without_changing_what_is_read(server):
    before = stored_ids(server)
    client(server).push(wire.episodes_body(episodes(8, seed=11)))
    deadline = time.monotonic() + 60
    while (
        not any((server.root / "store" / "rlds").glob("part_*/*/dataset_info.json"))
        and time.monotonic() < deadline
    ):
        time.sleep(0.2)
    assert any((server.root / "store" / "rlds").glob("part_*/*/dataset_info.json"))
    after = stored_ids(server)
    assert after[: len(before)] == before and len(after) == len(before) + 8 == len(set(after))


# ------------------------------------------------------------------------------------------ params
def test_params_pull_swaps_verified_versions_and_keeps_the_last_good_one(server, tmp_path):
    registry = ParamsRegistry(server.root / "params")
    registry.publish(policy_file(1, None))
    puller = fleet.ParamsPuller(client(server), tmp_path / "params.msgpack")
    assert puller.pull_once() and puller.version == 1
    manifest = client(server).manifest()
    assert (
        manifest["version"] == 1 and manifest["parent_version"] is None and len(manifest["file_sha256"]) == 64
    )

    # Version 2 is published, then corrupted on disk: the actor refuses it and keeps running version 1.
    registry.publish(policy_file(2, 1, seed=1))
    path = registry.path(2)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert not puller.pull_once() and puller.version == 1 and puller.stats["rejected"] == 1
    assert "sha256" in puller.last_error
    obs = {k: np.asarray(v[0]) for k, v in MODEL.fake_observation(jax.random.key(1), 1).items()}
    assert puller.policy.infer(obs)["actions"].shape == (MODEL.chunk, MODEL.action_size)

    # Version 3 verifies: swapped; and a restarted actor starts from its cached last good file.
    registry.publish(policy_file(3, 1, seed=2))
    assert puller.pull_once() and puller.version == 3
    assert fleet.ParamsPuller(client(server), tmp_path / "params.msgpack").version == 3


def test_heartbeat_and_label(server):
    answer = client(server, "robot-1").heartbeat({"policy_version": 3, "spool_episodes": 0})
    assert "latest_version" in answer
    robots = json.loads(client(server, "robot-1").request("GET", "/v1/robots")[0])
    assert robots["robot-1"]["spool_episodes"] == 0
    episode_id = stored_ids(server)[0]
    body = wire.packb({"operator_reward": 1.0, "success": True})
    client(server).request("POST", f"/v1/episodes/{episode_id}/label", body)
    with pytest.raises(fleet.Refused) as err:
        client(server).request("POST", "/v1/episodes/00000000-0000-4000-8000-000000000000/label", body)
    assert err.value.status == 404
    with pytest.raises(fleet.Refused) as err:
        client(server).request(
            "POST", f"/v1/episodes/{episode_id}/label", wire.packb({"operator_reward": "yes"})
        )
    assert err.value.status == 422 and "operator_reward" in err.value.message


def test_openpi_websocket_protocol(server):
    ParamsRegistry(server.root / "params")  # published by the params test, or publish one now
    if ParamsRegistry(server.root / "params").latest() is None:
        ParamsRegistry(server.root / "params").publish(policy_file(1, None))
    obs = {k: np.asarray(v[0]) for k, v in MODEL.fake_observation(jax.random.key(2), 1).items()}

    async def talk():
        async with aiohttp.ClientSession() as session:
            # openpi's client sends its key as "Api-Key <key>".
            headers = {"Authorization": f"Api-Key {TOKENS['robot-1']}"}
            async with session.ws_connect(server.url.replace("http", "ws") + "/", headers=headers) as ws:
                metadata = wire.unpackb(await ws.receive_bytes())
                await ws.send_bytes(wire.packb(obs))
                reply = wire.unpackb(await ws.receive_bytes())
                await ws.send_bytes(wire.packb({"prompt": obs["prompt"]}))
                error = await ws.receive_str()
            refused = await session.get(server.url + "/v1/policy")
            return metadata, reply, error, refused.status

    metadata, reply, error, status = asyncio.run(talk())
    assert metadata["policy_version"] == reply["policy_version"]
    assert reply["actions"].shape == (MODEL.chunk, MODEL.action_size) and "lacks" in error and status == 401


def test_slow_disk_does_not_block_the_event_loop(tmp_path):
    """A push whose disk write takes a second must not stall other requests (they run on the loop)."""

    class SlowStore(EpisodeStore):
        def commit(self, episode):
            time.sleep(1.0)
            return super().commit(episode)

    service = service_module.Service(
        SlowStore(tmp_path / "store"), ParamsRegistry(tmp_path / "params"), {TOKENS["robot-0"]: "robot-0"}
    )
    order = []

    async def run():
        async with TestClient(TestServer(service.app)) as http:
            headers = {"Authorization": f"Bearer {TOKENS['robot-0']}", "Content-Type": "application/msgpack"}

            async def push():
                response = await http.post(
                    "/v1/episodes", data=wire.episodes_body(episodes(1, seed=5)), headers=headers
                )
                order.append(("push", response.status))

            async def health():
                await asyncio.sleep(0.2)
                response = await http.get("/healthz")
                order.append(("health", response.status))

            await asyncio.gather(push(), health())

    asyncio.run(run())
    assert order == [("health", 200), ("push", 200)]
