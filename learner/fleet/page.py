"""The read-only fleet page: `render(...) -> html`, one self-contained document the service serves.

It shows the robots (last heartbeat, policy version, spool depth), the published params versions with
their gate verdicts, success and takeover rate per version and per robot over time, and the episode
store's compaction backlog. Charts are SVG drawn by matplotlib on the server and inlined, so the page
needs no script and no network: a robot cell's offline laptop shows it as well as an office browser.
Every value that came from a robot is escaped (html.escape; matplotlib escapes SVG text itself).
"""

import collections
import datetime
import html
import io

ROLLING = 20  # episodes in each point of a robot's rate over time
CHART_VERSIONS = 12  # bars drawn; the table lists every version
LEGEND_ROBOTS = 12
REFRESH_S = 15


def _time(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _table(headers: list[str], rows: list[list], table_id: str) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _rate(values: list[bool]) -> str:
    return f"{sum(values) / len(values):.1%}" if values else "-"


def _version_key(version: str):
    """Numeric versions in numeric order, then any other text ('operator')."""
    return (0, int(version), "") if version.isdecimal() else (1, 0, version)


def robot_rows(robots: dict[str, dict], now: float) -> list[list]:
    """[robot, last heartbeat, seconds ago, policy version, spool depth] per robot, by name."""
    rows = []
    for robot, status in sorted(robots.items()):
        seen = status.get("last_seen", now)
        rows.append(
            [
                robot,
                _time(seen),
                f"{now - seen:.0f}",
                status.get("policy_version", "-"),
                status.get("spool_episodes", "-"),
            ]
        )
    return rows


def version_rows(entries: list[dict]) -> list[list]:
    """[version, parent, published, verdict] per published version, newest first."""
    rows = []
    for entry in reversed(entries):
        gate = entry.get("gate") or {}
        if gate.get("initial"):
            verdict = "initial (the prior)"
        elif "passed" in gate:
            verdict = (
                f"{'passed' if gate['passed'] else 'failed'}: candidate {gate['candidate']:.3f} vs "
                f"current {gate['current']:.3f}, margin {gate['margin']:.3f}"
            )
            for name, m in gate.get("monitors", {}).items():
                verdict += f"; {name} {m['candidate']:.3f} vs {m['current']:.3f} (margin {m['margin']:.3f})"
        else:
            verdict = "published without a gate"
        parent = "-" if entry.get("parent_version") is None else entry["parent_version"]
        rows.append([entry["version"], parent, _time(entry["published"]), verdict])
    return rows


def outcome_rows(summaries: list[dict], key: str) -> list[list]:
    """[key value, episodes, success rate, takeover rate] grouped by `key` (policy_version or robot_id)."""
    groups = collections.defaultdict(list)
    for s in summaries:
        groups[str(s[key])].append(s)
    order = sorted(groups, key=_version_key if key == "policy_version" else str)
    return [
        [
            name,
            len(groups[name]),
            _rate([s["success"] for s in groups[name]]),
            _rate([s["takeover"] for s in groups[name]]),
        ]
        for name in order
    ]


def rolling(summaries: list[dict], field: str, window: int = ROLLING) -> tuple[list[float], list[float]]:
    """(times, rate of `field` over the last `window` episodes at each) of one robot's summaries."""
    times, rates, recent = [], [], collections.deque(maxlen=window)
    for s in sorted(summaries, key=lambda s: s["time"]):
        recent.append(bool(s[field]))
        times.append(s["time"])
        rates.append(sum(recent) / len(recent))
    return times, rates


def _svg(figure) -> str:
    """The figure as an inline <svg> element (matplotlib's document without its XML prologue)."""
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", bbox_inches="tight")
    text = buffer.getvalue()
    return text[text.index("<svg") :]


def charts(summaries: list[dict]) -> str:
    """Two inline SVG charts: success and takeover rate per version (bars), and each robot's rolling
    rates over time (lines)."""
    import matplotlib
    from matplotlib.figure import Figure

    # Text stays text in the SVG (searchable, and what the page test reads); '$' in a version is no math.
    with matplotlib.rc_context({"svg.fonttype": "none", "text.parse_math": False, "font.size": 9}):
        by_version = outcome_rows(summaries, "policy_version")[-CHART_VERSIONS:]
        figure = Figure(figsize=(6.4, 2.6))
        axes = figure.subplots()
        positions = range(len(by_version))
        for offset, column, label in ((-0.2, 2, "success"), (0.2, 3, "takeover")):
            axes.bar(
                [p + offset for p in positions],
                [float(r[column].rstrip("%")) for r in by_version],
                width=0.4,
                label=label,
            )
        axes.set_xticks(list(positions), [r[0] for r in by_version])
        title = "Per version" + (f" (newest {CHART_VERSIONS})" if len(by_version) == CHART_VERSIONS else "")
        axes.set(xlabel="policy version", ylabel="% of episodes", ylim=(0, 100), title=title)
        axes.legend(loc="upper left", fontsize=8)
        per_version = _svg(figure)

        figure = Figure(figsize=(6.4, 4.2))
        top, bottom = figure.subplots(2, 1, sharex=True)
        by_robot = collections.defaultdict(list)
        for s in summaries:
            by_robot[s["robot_id"]].append(s)
        for robot, mine in sorted(by_robot.items()):
            for axes, field in ((top, "success"), (bottom, "takeover")):
                times, rates = rolling(mine, field)
                stamps = [datetime.datetime.fromtimestamp(t, datetime.UTC) for t in times]
                axes.plot(stamps, [100 * r for r in rates], label=robot, marker=".", markersize=3)
        top.set(ylabel=f"success %\n(last {ROLLING})", ylim=(-5, 105), title="Per robot over time")
        bottom.set(ylabel=f"takeover %\n(last {ROLLING})", ylim=(-5, 105), xlabel="time (UTC)")
        if len(by_robot) <= LEGEND_ROBOTS:  # past that a legend hides the lines; the table names them
            top.legend(loc="upper left", fontsize=8)
        figure.autofmt_xdate()
        return per_version + _svg(figure)


STYLE = """
body { font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f3f3f3; }
.backlog { font-size: 1.1em; }
"""


def render(
    robots: dict[str, dict], entries: list[dict], summaries: list[dict], store: dict, now: float | None = None
) -> str:
    """The page. `robots`: last heartbeats (Service.robots); `entries`: ParamsRegistry.entries();
    `summaries`: EpisodeStore.summaries(); `store`: Service.store_status()."""
    import time

    now = time.time() if now is None else now
    compacting = " (compacting now)" if store["compacting"] else ""
    backlog = (
        f'<p class="backlog" id="store">Episodes stored: {store["episodes"]}. Compaction backlog: '
        f'<b id="backlog">{store["compaction_backlog"]}</b> waiting{compacting}; quarantined: '
        f"{store['quarantined']}.</p>"
    )
    sections = [
        "<h2>Episode store</h2>",
        backlog,
        "<h2>Robots</h2>",
        _table(
            ["robot", "last heartbeat", "seconds ago", "policy version", "spool depth"],
            robot_rows(robots, now),
            "robots",
        )
        if robots
        else "<p>No heartbeat yet.</p>",
        "<h2>Published versions</h2>",
        _table(["version", "parent", "published", "gate verdict"], version_rows(entries), "versions")
        if entries
        else "<p>Nothing published yet.</p>",
        "<h2>Outcomes</h2>",
    ]
    if summaries:
        sections += [
            _table(
                ["policy version", "episodes", "success", "takeover"],
                outcome_rows(summaries, "policy_version"),
                "by-version",
            ),
            _table(
                ["robot", "episodes", "success", "takeover"], outcome_rows(summaries, "robot_id"), "by-robot"
            ),
            f'<div id="charts">{charts(summaries)}</div>',
        ]
    else:
        sections.append("<p>No episodes yet.</p>")
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>jaxvla fleet</title>'
        f'<meta http-equiv="refresh" content="{REFRESH_S}"><style>{STYLE}</style></head><body>'
        f"<h1>jaxvla fleet</h1><p>As of {_time(now)}; refreshes every {REFRESH_S} s.</p>"
        + "".join(sections)
        + "</body></html>"
    )
