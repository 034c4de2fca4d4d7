"""The fleet page: a live `jaxvla serve` with pushed episodes, a heartbeat and gated versions, loaded in
headless Chromium; the test reads what the browser shows (its DOM after load) and checks the numbers.

Chromium is Debian's `chromium` package (`apt-get install chromium`); where it is not installed the
browser test is skipped with that reason, and the page's HTML is still checked without a browser.
"""

import html.parser
import json
import shutil
import subprocess
import urllib.error
import urllib.request

import numpy as np
import pytest
from test_fleet_service import TOKENS
from test_fleet_service import Server
from test_fleet_service import client
from test_fleet_service import episodes
from test_fleet_service import free_port
from test_fleet_service import policy_file

from jaxvla.actor import wire
from learner.fleet import page as fleet_page
from learner.fleet.store import ParamsRegistry

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
CHROMIUM = next((shutil.which(name) for name in BROWSERS if shutil.which(name)), None)


class Tables(html.parser.HTMLParser):
    """The text of every cell of every <table id=...>, and the text inside any element with an id."""

    def __init__(self):
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.ids: dict[str, str] = {}
        self.svg_count = 0
        self._table, self._cell, self._open_ids = None, None, []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "svg":
            self.svg_count += 1
        if tag == "table":
            self._table = attrs.get("id")
            self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self.tables[self._table].append([])
        elif tag in ("td", "th") and self._table:
            self._cell = ""
        if "id" in attrs and tag != "table":
            self._open_ids.append((tag, attrs["id"]))
            self.ids[attrs["id"]] = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[self._table][-1].append(self._cell.strip())
            self._cell = None
        elif tag == "table":
            self._table = None
        if self._open_ids and self._open_ids[-1][0] == tag:
            self._open_ids.pop()

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data
        for _, element in self._open_ids:
            self.ids[element] += data


def parse(document: str) -> Tables:
    tables = Tables()
    tables.feed(document)
    return tables


def rows(tables: Tables, table_id: str) -> dict[str, list[str]]:
    """{first cell: the other cells} of a table's body rows."""
    return {row[0]: row[1:] for row in tables.tables[table_id][1:]}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """A live service: 2 versions (the second gated), robot-0 runs v1 then v2, robot-1 runs v2 with the
    operator taking over in some episodes; one heartbeat. Returns (server, page url, what was pushed)."""
    page_port = free_port()
    srv = Server(
        tmp_path_factory.mktemp("page"), "--fleet.compact-every", "1000", "--fleet.page-port", str(page_port)
    )
    srv.start()
    registry = ParamsRegistry(srv.root / "params")
    registry.publish(policy_file(1, None), {"initial": True})
    registry.publish(
        policy_file(2, 1, seed=1), {"candidate": 0.625, "current": 0.5, "margin": 0.05, "passed": True}
    )
    # (robot, version): (episodes, success of each, operator takeover in each)
    yes, no = True, False
    plan = {
        ("robot-0", "1"): (4, [yes, no, no, no], [no] * 4),
        ("robot-0", "2"): (4, [yes, yes, yes, no], [no] * 4),
        ("robot-1", "2"): (5, [yes, yes, no, no, no], [yes, yes, no, yes, no]),
    }
    pushed = []
    for seed, ((robot, version), (n, wins, takeovers)) in enumerate(plan.items()):
        batch = episodes(n, robot=robot, seed=2000 + seed)
        for episode, won, took in zip(batch, wins, takeovers, strict=True):
            episode["episode_metadata"].update(policy_version=version, success=won)
            episode["steps"]["is_intervention"] = np.full_like(episode["steps"]["is_intervention"], took)
            pushed.append((robot, version, won, took))
        client(srv, robot).push(wire.episodes_body(batch))
    client(srv, "robot-0").heartbeat({"policy_version": 2, "spool_episodes": 3})
    yield srv, f"http://127.0.0.1:{page_port}/", pushed
    srv.stop()


def rate(flags: list[bool]) -> str:
    return f"{sum(flags) / len(flags):.1%}"


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (apt-get install chromium)")
def test_the_fleet_page_shows_robots_versions_outcomes_and_backlog_in_chromium(fleet):
    srv, url, pushed = fleet
    # --dump-dom prints the document as the browser built it after load; no token is sent.
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    shown = parse(result.stdout)

    robots = rows(shown, "robots")
    assert list(robots) == ["robot-0"] and robots["robot-0"][2:] == ["2", "3"]  # version, spool depth

    versions = rows(shown, "versions")
    assert list(versions) == ["2", "1"]  # newest first
    assert versions["2"][2] == "passed: candidate 0.625 vs current 0.500, margin 0.050"
    assert versions["1"][2] == "initial (the prior)"

    by_version = rows(shown, "by-version")
    for version in ("1", "2"):
        mine = [p for p in pushed if p[1] == version]
        assert by_version[version] == [str(len(mine)), rate([p[2] for p in mine]), rate([p[3] for p in mine])]
    by_robot = rows(shown, "by-robot")
    for robot in ("robot-0", "robot-1"):
        mine = [p for p in pushed if p[0] == robot]
        assert by_robot[robot] == [str(len(mine)), rate([p[2] for p in mine]), rate([p[3] for p in mine])]

    health = json.loads(client(srv).request("GET", "/healthz")[0])
    assert shown.ids["backlog"] == str(health["compaction_backlog"]) == str(len(pushed))
    assert shown.svg_count >= 2 and "Per version" in shown.ids["charts"] and "robot-1" in shown.ids["charts"]


def test_the_page_has_its_own_listener_and_the_api_keeps_its_tokens(fleet):
    srv, url, _ = fleet
    with urllib.request.urlopen(url, timeout=60) as answer:  # no token
        page = answer.read().decode()
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(srv.url + "/v1/robots", timeout=60)
    assert "<h1>jaxvla fleet</h1>" in page and refused.value.code == 401
    assert TOKENS["robot-0"] not in page


def test_what_robots_send_is_escaped_on_the_page():
    hostile = "<script>alert(1)</script>"
    summaries = [
        {
            "seq": 0,
            "episode_id": "x",
            "robot_id": "robot-0",
            "policy_version": hostile + "$x$",
            "success": True,
            "takeover": False,
            "time": 1.0e9,
        }
    ]
    robots = {"robot-0": {"policy_version": 1, "spool_episodes": 0, "note": hostile, "last_seen": 1.0e9}}
    store = {"episodes": 1, "compaction_backlog": 1, "quarantined": 0, "compacting": False}
    document = fleet_page.render(robots, [], summaries, store, now=1.0e9 + 5)
    assert "<script>" not in document and "&lt;script&gt;" in document
    assert rows(parse(document), "by-version")[hostile + "$x$"] == ["1", "100.0%", "0.0%"]
