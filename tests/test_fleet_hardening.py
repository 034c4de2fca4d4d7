"""The fleet service against an outside client (issue 25): each finding of that probe is a test here.

Real `jaxvla serve` processes on loopback (`test_fleet_service.Server`), bodies built the way an openpi
client or a hand-written one would build them. Nothing here compiles anything.
"""

import asyncio
import http.client
import json
import pathlib
import signal
import time
import urllib.request
import uuid

import aiohttp
import jax
import msgpack
import numpy as np
import pytest
from etils import epath
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from test_fleet_service import MODEL
from test_fleet_service import TOKENS
from test_fleet_service import Server
from test_fleet_service import episodes
from test_fleet_service import policy_file
from test_fleet_service import stored_ids

from jaxvla import episodes as E
from jaxvla.actor import wire
from learner.fleet.store import EpisodeStore
from learner.fleet.store import ParamsRegistry


def openpi_pack(obj) -> bytes:
    """msgpack as openpi's msgpack_numpy writes it: bytes keys, arrays as their raw bytes and shape (a
    0-d array keeps shape []), numpy scalars as __npgeneric__."""

    def encode(value):
        if isinstance(value, np.ndarray):
            return {
                b"__ndarray__": True,
                b"data": value.tobytes(),
                b"dtype": value.dtype.str,
                b"shape": list(value.shape),
            }
        if isinstance(value, np.generic):
            return {b"__npgeneric__": True, b"data": value.item(), b"dtype": value.dtype.str}
        raise TypeError(type(value))

    return msgpack.packb(obj, default=encode, use_bin_type=True)


def request(
    srv: Server,
    method: str,
    path: str,
    body: bytes | None = None,
    *,
    token: str | None = "robot-0",
    auth: str = "Bearer",
    content_type: str | None = "application/msgpack",
) -> tuple[int, dict]:
    """(status, JSON answer) of one raw HTTP request; `token` a robot name, or None for no header."""
    headers = {}
    if token is not None:
        headers["Authorization"] = f"{auth} {TOKENS[token]}"
    if content_type is not None:
        headers["Content-Type"] = content_type
    req = urllib.request.Request(srv.url + path, data=body, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())  # every error is JSON: a text answer fails here


def push(srv: Server, batch: list[dict], pack=wire.packb, robot: str = "robot-0") -> tuple[int, dict]:
    return request(srv, "POST", "/v1/episodes", pack({"protocol": 1, "episodes": batch}), token=robot)


def wait_for(condition, what: str, timeout_s: float = 120.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"gave up waiting for {what}")


def part_ids(root: pathlib.Path) -> list[str]:
    """Episode ids in the landed RLDS parts of a store."""
    rlds = root / "store" / "rlds"
    ids = []
    for sidecar in rlds.glob("part_*.ids.json"):
        if any((rlds / sidecar.name.removesuffix(".ids.json")).glob("*/dataset_info.json")):
            ids += [row[1] for row in json.loads(sidecar.read_text())]
    return ids


def ids_of(batch: list[dict]) -> list[str]:
    return [ep["episode_metadata"]["episode_id"] for ep in batch]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("hardening"), "--fleet.compact-every", "4")
    srv.start()
    yield srv
    srv.stop()


# -------------------------------------------------------------- 1. scalars in either encoding, compacted
def test_zero_d_metadata_in_openpi_encoding_is_stored_and_compacted(server):
    """Finding 1: np.array(True) in openpi's encoding (shape []) got 200, then stopped compaction for good."""
    batch = episodes(4, seed=100)
    for ep in batch:
        ep["episode_metadata"].update(
            success=np.array(True), operator_reward=np.array(0.5, np.float32), retries=np.array(2, np.int64)
        )
    status, answer = push(server, batch, pack=openpi_pack)
    assert status == 200 and answer["stored"] == ids_of(batch)
    wait_for(lambda: set(ids_of(batch)) <= set(part_ids(server.root)), "the 0-d episodes to be compacted")
    read = dict(EpisodeStore(server.root / "store", writer=False).read_since(-1))
    back = {ep["episode_metadata"]["episode_id"]: ep["episode_metadata"] for ep in read.values()}
    assert [back[i]["retries"] for i in ids_of(batch)] == [2] * 4
    assert all(back[i]["success"] for i in ids_of(batch))


def test_the_wire_encoder_keeps_zero_d_arrays_zero_d():
    """Finding 1's cause: the encoder turned a 0-d array into shape [1]."""
    for value in (np.array(True), np.array(3, np.int32), np.array(1.5, np.float32)):
        back = wire.unpackb(wire.packb(value))
        assert back.shape == () and back == value


metadata_number = {
    "success": st.sampled_from([True, False]),
    "operator_reward": st.floats(-1e6, 1e6, allow_nan=False, width=32),
    "retries": st.integers(0, 2**31 - 1),
    "cycle_time": st.floats(0, 1e6, allow_nan=False, width=32),
}
DTYPES = {"success": np.bool_, "operator_reward": np.float32, "retries": np.int32, "cycle_time": np.float32}


@st.composite
def schema_valid_episodes(draw):
    """A random schema-valid episode, its metadata numbers each a Python scalar, a numpy scalar or a
    0-d array, and its text any unicode."""
    episode = E.random_episode(
        np.random.default_rng(draw(st.integers(0, 2**32 - 1))), draw(st.integers(1, 6))
    )
    metadata = episode["episode_metadata"]
    for name, values in metadata_number.items():
        value = draw(values)
        form = draw(st.sampled_from(["python", "numpy scalar", "0-d array"]))
        if form != "python":
            value = DTYPES[name](value) if form == "numpy scalar" else np.array(value, DTYPES[name])
        metadata[name] = value
    for name in ("task", "prompt", "policy_version"):
        metadata[name] = draw(st.text(max_size=40))
    return episode


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    batch=st.lists(
        schema_valid_episodes(),
        min_size=1,
        max_size=3,
        unique_by=lambda episode: episode["episode_metadata"]["episode_id"],
    ),
    openpi=st.booleans(),
)
def test_every_accepted_episode_compacts_and_reads_back(tmp_path_factory, batch, openpi):
    """The property behind finding 1: whatever the validation accepts, through either encoder, the store
    writes into RLDS and reads back with the same values."""
    store = EpisodeStore(tmp_path_factory.mktemp("property") / "store")
    pack = openpi_pack if openpi else wire.packb
    for episode in batch:
        canonical = E.canonical_episode(wire.unpackb(pack(episode)))
        store.commit(canonical)
    assert store.compact(1) == len(batch) and store.backlog == 0 and store.quarantined == 0
    read = [ep for _, ep in store.read_since(-1)]
    for sent, back in zip(batch, read, strict=True):
        for name, value in sent["episode_metadata"].items():
            expected = DTYPES[name](value).item() if name in DTYPES else value
            assert back["episode_metadata"][name] == expected, name
        np.testing.assert_array_equal(back["steps"]["action"], sent["steps"]["action"])


# ------------------------------------------------------------------------- 7. ranges that fit RLDS
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("retries", 2**40),
        ("retries", -(2**63)),
        ("retries", -1),
        ("operator_reward", 1e300),
        ("cycle_time", -1e39),
        ("cycle_time", float("inf")),
        ("operator_reward", float("nan")),
    ],
)
def test_out_of_range_metadata_is_refused_naming_the_field(server, field, value):
    batch = episodes(1, seed=200)
    batch[0]["episode_metadata"][field] = value
    status, answer = push(server, batch)
    assert status == 422 and f"episode_metadata/{field}" in answer["error"], answer


def test_an_error_quotes_a_huge_bad_value_briefly(server):
    """The 422 names the field and the value's start, not a megabyte of it (nor does a log line)."""
    batch = episodes(1, seed=210)
    batch[0]["episode_metadata"]["task"] = b"x" * (1 << 20)
    status, answer = push(server, batch)
    assert status == 422 and "episode_metadata/task" in answer["error"] and len(answer["error"]) < 300


# -------------------------------------------------------------------------- 2. canonical UUIDs only
def spellings(canonical: str) -> dict[str, str]:
    fullwidth = canonical.translate({ord(d): ord(d) - ord("0") + ord("０") for d in "0123456789"})
    return {
        "upper case": canonical.upper(),
        "braces": "{" + canonical + "}",
        "urn": "urn:uuid:" + canonical,
        "no dashes": canonical.replace("-", ""),
        "newline for a digit": canonical[:-1] + "\n",
        "fullwidth digits": fullwidth,
    }


@pytest.mark.parametrize("spelling", sorted(spellings(str(uuid.uuid4()))))
def test_non_canonical_uuid_spellings_are_refused_naming_the_field(server, spelling):
    batch = episodes(1, seed=300)
    canonical = batch[0]["episode_metadata"]["episode_id"]
    batch[0]["episode_metadata"]["episode_id"] = spellings(canonical)[spelling]
    status, answer = push(server, batch)
    assert status == 422 and "episode_metadata/episode_id" in answer["error"], answer
    sent = batch[0]["episode_metadata"]["episode_id"]
    assert f"send it as {str(uuid.UUID(sent))!r}" in answer["error"]  # uuid.UUID parsed every one of them
    assert str(uuid.UUID(sent)) not in stored_ids(server)


# --------------------------------------------------------------------------------- 3. label auth
def test_a_robot_cannot_label_another_robots_episode(server):
    batch = episodes(1, robot="robot-1", seed=400)
    assert push(server, batch, robot="robot-1")[0] == 200
    path = f"/v1/episodes/{ids_of(batch)[0]}/label"
    body = wire.packb({"operator_reward": 1.0, "success": True})
    status, answer = request(server, "POST", path, body, token="robot-0")
    assert status == 403 and "robot-0" in answer["error"]
    assert request(server, "POST", path, body, token="robot-1")[0] == 200
    labels = EpisodeStore(server.root / "store", writer=False).labels()
    assert labels[ids_of(batch)[0]]["success"] is True


# ---------------------------------------------------------------------------- 4. NaN at inference
def test_non_finite_observations_and_huge_batches_get_an_error_not_actions(server):
    registry = ParamsRegistry(server.root / "params")
    if registry.latest() is None:
        registry.publish(policy_file(1, None))
    obs = {k: np.asarray(v[0]) for k, v in MODEL.fake_observation(jax.random.key(3), 1).items()}
    nan = dict(obs, proprio=np.full_like(obs["proprio"], np.nan))
    as_list = dict(obs, telemetry=[float("inf")] * len(obs["telemetry"]))
    batch = {k: np.repeat(v[None], 300, axis=0) for k, v in obs.items()}

    async def talk():
        headers = {"Authorization": f"Bearer {TOKENS['robot-0']}"}
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(server.url.replace("http", "ws") + "/", headers=headers) as ws:
                await ws.receive_bytes()  # metadata
                replies = []
                for message in (nan, as_list, batch, obs):
                    await ws.send_bytes(openpi_pack(message))
                    reply = await ws.receive()
                    replies.append(
                        reply.data if reply.type == aiohttp.WSMsgType.TEXT else wire.unpackb(reply.data)
                    )
                return replies

    nan_reply, list_reply, batch_reply, good = asyncio.run(talk())
    assert "'proprio' has non-finite values" in nan_reply and "'telemetry'" in list_reply
    assert "over the limit of 256" in batch_reply
    assert np.all(np.isfinite(good["actions"]))  # the connection still serves good observations


# ------------------------------------------------------------------------ 6. versions and heartbeats
@pytest.mark.parametrize("version", ["%C2%B2", "%EF%BC%91", "1%0A", "-1", "1e3", "9" * 40])
def test_params_versions_are_ascii_digits_only(server, version):
    """'²' passed str.isdigit and crashed int(); fullwidth '１' served version 1."""
    status, answer = request(server, "GET", f"/v1/params/{version}")
    assert status == 400 and "ASCII digits" in answer["error"]


@pytest.mark.parametrize(
    "body",
    [
        msgpack.packb({b"policy_version": 1}),
        msgpack.packb({"policy_version": 1, "loop_p99_ms": float("nan")}),
        msgpack.packb({"policy_version": "v1"}),
        msgpack.packb({"spool_episodes": -1}),
        msgpack.packb({"note": "x" * 1000}),
        msgpack.packb([1, 2]),
    ],
    ids=["bytes key", "NaN value", "text version", "negative spool", "long text", "not a map"],
)
def test_bad_heartbeats_are_refused_and_the_robot_table_stays_json(server, body):
    assert (
        request(
            server,
            "POST",
            "/v1/heartbeat",
            wire.packb({"policy_version": 1, "spool_episodes": 2}),
            token="robot-1",
        )[0]
        == 200
    )
    status, answer = request(server, "POST", "/v1/heartbeat", body, token="robot-1")
    assert status == 422, answer
    status, robots = request(server, "GET", "/v1/robots")  # strict JSON: NaN would not parse
    assert status == 200 and robots["robot-1"]["spool_episodes"] == 2


# ---------------------------------------------------------------------------------- 8. small points
@pytest.mark.parametrize("content_type", [None, "", " ; charset=utf-8"])
def test_a_push_without_a_content_type_is_415(server, content_type):
    """aiohttp reads a missing or empty Content-Type as application/octet-stream, which passed as msgpack.
    (http.client: urllib would add a form Content-Type of its own.)"""
    headers = {"Authorization": f"Bearer {TOKENS['robot-0']}"}
    if content_type is not None:
        headers["Content-Type"] = content_type
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.request("POST", "/v1/episodes", wire.episodes_body(episodes(1, seed=500)), headers)
    response = connection.getresponse()
    answer = json.loads(response.read())
    connection.close()
    assert response.status == 415 and "msgpack" in answer["error"]


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "api-key"])
def test_the_auth_scheme_is_case_insensitive(server, scheme):
    assert request(server, "GET", "/v1/robots", auth=scheme)[0] == 200


def test_unknown_routes_and_wrong_methods_answer_json(server):
    status, answer = request(server, "GET", "/v1/nothing-here")
    assert status == 404 and "/v1/nothing-here" in answer["error"]
    status, answer = request(server, "DELETE", "/v1/episodes")
    assert status == 405 and "DELETE" in answer["error"]


# ---------------------------------------------------------------------- 5. compaction, bounded and safe
def test_compaction_writes_bounded_parts_and_reports_its_backlog(tmp_path):
    srv = Server(tmp_path / "fleet", "--fleet.compact-every", "3", "--fleet.part-episodes", "3")
    srv.start()
    try:
        batch = episodes(10, seed=600)
        assert push(srv, batch)[0] == 200

        def drained():
            health = request(srv, "GET", "/healthz", token=None)[1]
            return health if health["compaction_backlog"] < 3 and not health["compacting"] else None

        health = wait_for(drained, "the backlog to drain")
        assert health["episodes"] == 10 and health["compaction_backlog"] == 1 and health["quarantined"] == 0
        sidecars = sorted((srv.root / "store" / "rlds").glob("part_*.ids.json"))
        assert [len(json.loads(p.read_text())) for p in sidecars] == [3, 3, 3]
    finally:
        srv.stop()


def test_a_kill_during_compaction_leaves_nothing_after_restart(tmp_path):
    """Finding 5: each kill -9 mid-part left a tfds `.part_*.incomplete-*` folder that start-up never
    removed. After the restart no debris is left, nothing is lost, and compaction goes on."""
    srv = Server(tmp_path / "fleet", "--fleet.compact-every", "48", "--fleet.part-episodes", "48")
    srv.start()
    rlds = srv.root / "store" / "rlds"
    batch = episodes(48, seed=700, length=300)
    for start in range(0, 48, 16):
        assert push(srv, batch[start : start + 16])[0] == 200
    wait_for(lambda: list(rlds.glob(".part_*.incomplete-*")), "compaction to start writing its part")
    srv.kill9()
    assert list(rlds.glob(".part_*.incomplete-*")), "the kill came too late to test anything"
    srv.start()
    try:
        assert list(rlds.glob(".part_*")) == []
        assert sorted(stored_ids(srv)) == sorted(ids_of(batch))
        more = episodes(48, seed=701)
        assert push(srv, more)[0] == 200
        wait_for(lambda: set(ids_of(batch + more)) <= set(part_ids(srv.root)), "compaction after restart")
    finally:
        srv.stop()


def test_sigterm_stops_a_compaction_between_episodes_and_loses_nothing(tmp_path):
    """Finding 5: SIGTERM waited for the whole running compaction (38 s), so a supervisor killed it
    mid-write. Now the part is abandoned cleanly; its episodes wait in incoming/ for the next start."""
    srv = Server(tmp_path / "fleet", "--fleet.compact-every", "128", "--fleet.part-episodes", "128")
    srv.start()
    rlds = srv.root / "store" / "rlds"
    batch = episodes(128, seed=800, length=300)
    for start in range(0, 128, 16):
        assert push(srv, batch[start : start + 16])[0] == 200
    wait_for(lambda: list(rlds.glob(".part_*.incomplete-*")), "compaction to start writing its part")
    srv.process.send_signal(signal.SIGTERM)
    assert srv.process.wait(timeout=120) == 0
    assert list(rlds.glob(".part_*")) == [] and list(rlds.glob("*.ids.json")) == []
    store = EpisodeStore(srv.root / "store")
    assert sorted(store.episode_ids()) == sorted(ids_of(batch)) and store.backlog == 128


def old_style_poison(root: pathlib.Path, seq: int) -> str:
    """An episode file exactly as the old service stored a 0-d `success`: shape [1], which the RLDS
    writer refuses. Returns its id."""
    episode = episodes(1, seed=900)[0]
    episode["episode_metadata"]["success"] = np.array([True])
    episode_id = episode["episode_metadata"]["episode_id"]
    (root / "store" / "incoming" / f"{seq:010d}-{episode_id}.msgpack").write_bytes(wire.packb(episode))
    return episode_id


def test_a_poison_episode_is_quarantined_and_the_others_compact(tmp_path):
    srv = Server(tmp_path / "fleet", "--fleet.compact-every", "4")
    srv.start()
    first = episodes(2, seed=901)
    assert push(srv, first)[0] == 200
    srv.stop()
    poison = old_style_poison(srv.root, seq=2)
    srv.start()
    try:
        later = episodes(2, seed=902)
        assert push(srv, later)[0] == 200  # 5 waiting: compaction starts
        wait_for(lambda: set(ids_of(first + later)) <= set(part_ids(srv.root)), "the good episodes' part")
        quarantine = srv.root / "store" / "quarantine"
        reason = (quarantine / f"{2:010d}-{poison}.msgpack.reason").read_text()
        assert "episode_metadata/success" in reason and poison not in part_ids(srv.root)
        assert request(srv, "GET", "/healthz", token=None)[1]["quarantined"] == 1
        assert push(srv, [dict(episodes(1, seed=900)[0])])[1]["duplicates"] == [poison]  # still known
    finally:
        srv.stop()


def test_an_older_services_non_canonical_file_is_quarantined_at_start_up(tmp_path):
    """Finding 2's leftovers: a file stored under an upper-case id was invisible to every reader and the
    same episode could be stored again. Start-up now moves it aside with its reason."""
    store = EpisodeStore(tmp_path / "store")
    episode = episodes(1, seed=1100)[0]
    store.commit(E.canonical_episode(episode))
    shouting = str(uuid.uuid4()).upper()
    (tmp_path / "store" / "incoming" / f"{1:010d}-{shouting}.msgpack").write_bytes(wire.packb(episode))
    store = EpisodeStore(tmp_path / "store")
    assert [p.name for p in (tmp_path / "store" / "incoming").iterdir()] == [
        f"{0:010d}-{ids_of([episode])[0]}.msgpack"
    ]
    reason = (tmp_path / "store" / "quarantine" / f"{1:010d}-{shouting}.msgpack.reason").read_text()
    assert "not a store file name" in reason and store.quarantined == 1 and store.backlog == 1


# ------------------------------------------------------------------------------ the root is an epath
def test_the_store_and_registry_work_through_an_epath_root(tmp_path):
    root = epath.Path(tmp_path) / "fleet"
    store = EpisodeStore(root / "store")
    batch = episodes(1, seed=1000) + episodes(1, robot="robot-1", seed=1001) + episodes(1, seed=1002)
    for episode in batch:
        store.commit(E.canonical_episode(episode))
    assert store.compact(1, max_episodes=2) == 2 and store.backlog == 1
    assert [ep["episode_metadata"]["episode_id"] for _, ep in store.read_since(-1)] == ids_of(batch)
    # The robot behind each id, for label auth: from the part's id list, from incoming/, and from the part
    # itself where an older id list has no robot column.
    robots = ["robot-0", "robot-1", "robot-0"]
    assert [store.robot_of(i) for i in ids_of(batch)] == robots and store.robot_of(str(uuid.uuid4())) is None
    (sidecar,) = (root / "store" / "rlds").glob("part_*.ids.json")
    sidecar.write_text(json.dumps([row[:2] for row in json.loads(sidecar.read_text())]))
    assert [store.robot_of(i) for i in ids_of(batch)] == robots
    registry = ParamsRegistry(root / "params")
    registry.publish(policy_file(1, None))
    assert (
        registry.latest()["version"] == 1
        and registry.read(1) == (root / "params" / "policy-v000001.msgpack").read_bytes()
    )
