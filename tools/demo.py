"""`jaxvla demo [--full] [--section.field value ...]`: the main job, every method compared end to end.

From nothing but this repository, on `target.task` / `target.split` (`deploy`: the prior mostly works, a
tail fails), every arm scored as `jaxvla patch` scores them: the fixed test contexts
(`learner.evaluate.TEST`) for the headline, the disjoint validation contexts (`VALIDATION`) for effort to
`patch.goal`, and each arm's final policy on the test contexts of the `novel` stress split.

 1. data          scripted-operator demonstrations: `train` for the prior, the split's for full SFT, the
                  split's tails (`tail`) for targeted SFT
 2. prior         the foundation prior, by behaviour cloning (`pretrain.*`), then scored
 3. fleet         the prior deployed through the fleet on loopback: `jaxvla serve` and `demo.robots` numpy
                  `jaxvla actor` processes (C-MuJoCo twins): one on `train`, the others on the split, the
                  last of them with the operator; their logs are PRO's deployment data
 4. sft           full SFT retraining on the split's demonstrations (`patch.sft_demos`)
 5. targeted_sft  the same on demonstrations of the tail components alone
 6. hg_dagger     HG-DAgger: BC on the operator's takeover segments (`patch.hg_dagger_rounds`)
 7. patch         policy patching with the operator's sparse reward
 8. pro           two PROs trained on demonstrations and fleet logs: a state-only one (reward shaping,
                  takeover trigger) with its held-out figures, an action-conditioned one (ranking)
 9. patch_pro     patching with the PRO reward
10. patch_risk    patching with PRO-triggered takeovers (ρ > `pro.risk_threshold`)
11. rank          the prior's chunks ranked by PRO at inference: one evaluation, no training
12. recap         Recap
13. ript          RIPT from a few-shot SFT start (`ript.sft_demos`)
14. report        the comparison table, the seeds' claims beside our figures, plots and `report.md`

Once the prior exists, the stages run in two processes (`FIRST_LANE`, `SECOND_LANE`; `demo.lanes`), so
compiling keeps both cores busy; docs/demo.md has the measured run.

Everything lands in `out_dir` (`runs/demo`, or `runs/demo_full` with `--full`: larger budgets, three
seeds). Each finished stage leaves `stages/<name>.json`, so a rerun skips it and an interrupted run
resumes where it stopped.
"""

import collections
import dataclasses
import json
import os
import pathlib
import platform
import socket
import subprocess
import sys
import time
import urllib.request

import jax
import numpy as np

import configs
from jaxvla import episodes as rlds
from jaxvla import export
from learner import compile_cache
from learner import evaluate
from learner import patch
from learner import pretrain
from learner import pro
from learner.fleet.store import EpisodeStore
from learner.fleet.store import ParamsRegistry
from tools import pro as pro_tool
from tools import recap as recap_tool
from tools import reporting
from tools import ript as ript_tool
from tools import serve as serve_tool

PROG = "jaxvla demo"
# Every section but `env`, which only `jaxvla sim` reads (the demo pretrains its own prior: it reads `model`).
SECTIONS = tuple(section for section in configs.SECTIONS if section != "env")
ARMS = {  # stage -> row label, in the table's order
    "prior": "prior",
    "sft": "full SFT retraining",
    "targeted_sft": "targeted SFT (tail demonstrations)",
    "hg_dagger": "HG-DAgger (takeover segments)",
    "patch": "policy patching",
    "patch_pro": "patching with the PRO reward",
    "patch_risk": "patching with PRO-triggered takeovers",
    "rank": "PRO ranking at inference (the prior's chunks)",
    "recap": "Recap",
    "ript": "RIPT (from a few-shot SFT)",
}
UNTRAINED = ("prior", "rank")  # evaluated once, never trained: effort columns do not apply
ONE_EVALUATION = "-"  # the seed key of an arm that is evaluated once (no training seed)


# ------------------------------------------------------------------------------------------- stages
class Stages:
    """Runs named stages once: a finished stage's JSON result is kept in `stages/` and read back. Each
    records its wall-clock, the part of it spent compiling (tracing, lowering, compiling or loading
    from the persistent cache), the programs it compiled or loaded, by name, and those it built again:
    identical to one this process had built before, so not reused."""

    def __init__(self, out: pathlib.Path, total: int):
        self.folder, self.total, self.done = out / "stages", total, 0
        self.folder.mkdir(parents=True, exist_ok=True)
        # Finished before this invocation began (the other lane's, read back later, are not among them).
        self.earlier = {path.stem for path in self.folder.glob("*.json")}
        self.read_back: list[str] = []  # the stages an earlier invocation finished
        self.tic = time.perf_counter()
        self.compiling = compile_cache.CompileClock()
        self.builds = compile_cache.ProgramLog()

    def __call__(self, name: str, what: str, fn) -> dict:
        """The stage's result: read back if an earlier run finished it, else run now."""
        self.done += 1
        path = self.folder / f"{name}.json"
        elapsed = time.perf_counter() - self.tic
        if path.exists():
            print(f"[{self.done}/{self.total}] {name}: done, read back from {path}", flush=True)
            if name in self.earlier:
                self.read_back.append(name)
            return json.loads(path.read_text())
        print(f"\n[{self.done}/{self.total}] {name}: {what}  (elapsed {elapsed / 60:.1f} min)", flush=True)
        tic, compiled = time.perf_counter(), self.compiling.seconds
        programs = collections.Counter(self.compiling.programs)
        built_again = collections.Counter(self.builds.built_again())
        result = fn()
        result["stage_wall_s"] = time.perf_counter() - tic
        result["stage_compile_s"] = self.compiling.seconds - compiled
        # By name. A name counts again for each new shape (the base's BC program per dataset bucket) and
        # for each recompile (per seed or round), which the table then shows.
        result["stage_programs"] = dict(self.compiling.programs - programs)
        result["stage_built_again"] = dict(collections.Counter(self.builds.built_again()) - built_again)
        print(
            f"{name}: {result['stage_wall_s']:.0f} s, {result['stage_compile_s']:.0f} s of it compiling",
            flush=True,
        )
        path.write_text(json.dumps(result, indent=1, default=float))
        return result


def demonstrations(config: configs.Config) -> dict:
    tc, pc, pre = config.target, config.patch, config.pretrain
    train = patch.demonstrations(config, "train", max(pre.demos_per_task, pc.offline_episodes))
    split = patch.demonstrations(config, tc.split, max(*pc.sft_demos, config.ript.sft_demos))
    tail = patch.demonstrations(config, "tail", max(pc.sft_demos))
    return {
        "train": len(train),
        tc.split: len(split),
        "tail": len(tail),
        "train_success": float(np.mean([ep["episode_metadata"]["success"] for ep in train])),
    }


class NovelScore:
    """The `novel` stress column: a final policy's success on the test contexts of `novel`, with one
    compiled evaluator per kind of actor ("chunk": the chunk policy, "patch": the patching learner's)."""

    def __init__(self, config: configs.Config, prior: pretrain.Prior):
        tc = config.target
        self.task, self.episodes = tc.task, tc.eval_episodes
        self.contexts = evaluate.TEST.with_episodes(tc.eval_episodes)
        self.actors = {
            "chunk": lambda: evaluate.chunk_actor(prior.graphdef, prior.stats),
            "patch": lambda: patch.policy_actor(config, prior),
        }
        self.evaluators: dict[str, evaluate.Evaluator] = {}

    def __call__(self, params, actor: str = "chunk") -> float:
        if actor not in self.evaluators:
            self.evaluators[actor] = evaluate.Evaluator(
                self.task, "novel", self.episodes, self.actors[actor]()
            )
        return self.evaluators[actor].on(params, self.contexts)["success_rate"]


def train_prior(config: configs.Config, out: pathlib.Path) -> dict:
    """The prior trained, then scored like every arm: test and validation contexts, and `novel`."""
    pre = config.pretrain
    demos = patch.demonstrations(config, "train", pre.demos_per_task)
    step = pretrain.train(config, demos, out / "prior").step
    prior = pretrain.load(out / "prior")
    record = {"kind": "prior", **patch.paired_evaluation(config, prior)(prior.params)}
    return {
        "step": step,
        "seeds": {ONE_EVALUATION: [record]},
        "novel": {ONE_EVALUATION: NovelScore(config, prior)(prior.params)},
    }


# -------------------------------------------------------------------------------------------- fleet
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{PROG}: the fleet service exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{PROG}: the fleet service at {url} did not answer in {timeout_s:.0f} s")


def deploy(config: configs.Config, prior: pretrain.Prior, out: pathlib.Path) -> dict:
    """The prior published to a fresh fleet; `demo.robots` numpy actors run it on the split and push their
    episodes to the service over loopback HTTP. Returns what reached the store, per robot."""
    tc, dc = config.target, config.demo
    root = out / "fleet"
    fleet = dataclasses.replace(
        config.fleet, root=str(root), robots=dc.robots, port=free_port(), learner=False
    )
    registry = ParamsRegistry(root / "params")
    if registry.latest() is None:
        path = export.write(
            root / "prior.msgpack",
            prior.model,
            prior.params,
            prior.stats,
            version=prior.step,
            parent_version=None,
            config_hash=prior.config_hash,
        )
        registry.publish(path.read_bytes(), {"initial": True})
    tokens = serve_tool.tokens_file(fleet)
    url = f"http://{fleet.host}:{fleet.port}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    serve_args = [
        config.name,
        "--fleet.root",
        str(root),
        "--fleet.port",
        str(fleet.port),
        "--fleet.no-learner",
    ]
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with (logs / "serve.out").open("w") as serve_out:
        service = subprocess.Popen(
            [sys.executable, "-m", "tools.serve", *serve_args],
            stdout=serve_out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        wait_healthy(url, service)
        actors = []
        for i, (split, operator) in enumerate(robot_roles(dc.robots, tc.split)):
            command = [
                *(sys.executable, "-m", "tools.actor", "--url", url, "--robot-id", f"robot-{i}"),
                *("--token-file", str(tokens), "--task", tc.task, "--split", split),
                *("--episodes", str(dc.episodes_per_robot), "--hz", "0", "--seed", str(100_000 * i)),
                *("--folder", str(root / f"robot-{i}"), "--log", str(logs / f"robot-{i}.jsonl")),
                *(["--operator"] if operator else []),
            ]
            with (logs / f"robot-{i}.out").open("w") as actor_out:
                actors.append(subprocess.Popen(command, stdout=actor_out, stderr=subprocess.STDOUT, env=env))
        watch_actors(actors, logs, dc.robots * dc.episodes_per_robot)
    finally:
        service.terminate()
        service.wait(timeout=60)
    episodes = [episode for _, episode in EpisodeStore(root / "store").read_since(-1)]
    logged = pathlib.Path(config.pretrain.data_dir) / "pro" / f"{tc.task}_fleet"
    rlds.write_episodes(logged, episodes, overwrite=True)
    expected = dc.robots * dc.episodes_per_robot
    return {
        "url": url,
        "robots": fleet_summary(episodes, robot_roles(dc.robots, tc.split)),
        "expected": expected,
        "stored": len(episodes),
    }


def watch_actors(actors: list[subprocess.Popen], logs: pathlib.Path, total: int) -> None:
    """Waits for every actor, with a bar over the episodes they have run."""
    from tqdm import tqdm

    with tqdm(total=total, desc="fleet episodes", unit="episode") as bar:
        while any(a.poll() is None for a in actors):
            time.sleep(1.0)
            ran = sum(len(p.read_text().splitlines()) for p in logs.glob("robot-*.jsonl"))
            bar.update(ran - bar.n)
    failed = [i for i, a in enumerate(actors) if a.returncode]
    if failed:
        raise RuntimeError(f"{PROG}: actors {failed} failed; see {logs}/robot-<i>.out")


def robot_roles(robots: int, split: str) -> list[tuple[str, bool]]:
    """(split, operator) per robot: the first works on `train` (where the prior was trained), the others
    on `split`, the last of them with the operator as its teleop device."""
    return [("train", False)] + [(split, i == robots - 1) for i in range(1, robots)]


def fleet_summary(episodes: list[dict], roles: list[tuple[str, bool]]) -> dict:
    rows = {}
    for i, (split, operator) in enumerate(roles):
        mine = [ep for ep in episodes if ep["episode_metadata"]["robot_id"] == f"robot-{i}"]
        meta = [ep["episode_metadata"] for ep in mine]
        rows[f"robot-{i}"] = {
            "split": split,
            "operator": operator,
            "episodes": len(mine),
            "success_rate": float(np.mean([m["success"] for m in meta])) if meta else None,
            "with_takeover": int(sum(ep["steps"]["is_intervention"].any() for ep in mine)),
            "retries_per_episode": float(np.mean([m["retries"] for m in meta])) if meta else None,
        }
    return rows


# ------------------------------------------------------------------------------------------ methods
# Every method stage returns {"seeds": {seed: records}, "novel": {seed: final policy's novel success}}.
def sft_arm(
    config: configs.Config,
    prior: pretrain.Prior,
    offline: list[dict],
    novel: NovelScore,
    programs: patch.RetrainPrograms,
    *,
    split: str,
    kind: str,
) -> dict:
    """Full SFT (demonstrations of `split`) or targeted SFT (of `tail`), one retraining per demo count."""
    tc, pc = config.target, config.patch
    demos = patch.demonstrations(config, split, max(pc.sft_demos))
    seeds, finals = {}, {}
    for seed in tc.seeds:
        seeds[seed], params = patch.run_sft(
            config, prior, demos, offline, seed=seed, kind=kind, programs=programs
        )
        finals[seed] = novel(params)
    return {"seeds": seeds, "novel": finals}


def hg_dagger(
    config: configs.Config,
    prior: pretrain.Prior,
    offline: list[dict],
    novel: NovelScore,
    programs: patch.RetrainPrograms,
) -> dict:
    seeds, finals = {}, {}
    for seed in config.target.seeds:
        seeds[seed], params = patch.run_hg_dagger(config, prior, offline, seed=seed, programs=programs)
        finals[seed] = novel(params)
    return {"seeds": seeds, "novel": finals}


def patching(
    config: configs.Config,
    prior: pretrain.Prior,
    offline: list[dict],
    out: pathlib.Path,
    novel: NovelScore,
    retrain: patch.Retrainer,
) -> dict:
    """`retrain`: the baselines' BC retraining, which the base's retraining reuses (the same program)."""
    seeds, finals = {}, {}
    programs = patch.Programs.build(config, prior, retrain=retrain)
    for seed in config.target.seeds:
        seeds[seed], params = patch.run_patching(
            config, prior, offline, out / f"seed{seed}", seed=seed, programs=programs
        )
        finals[seed] = novel(params, "patch")
    return {"seeds": seeds, "novel": finals}


RANKING_CONSERVATIVE = 5.0  # the ranking PRO's Cal-QL α (V-GPS's); the state-only PRO has no such term


def pro_config(config: configs.Config, out: pathlib.Path, *, action_input: bool) -> configs.Config:
    """PRO's settings for one of its uses: state-only (a potential and a state risk) in `out/pro`, or
    action-conditioned (it scores chunks, so it can rank them) in `out/ranking/pro`."""
    net = dataclasses.replace(config.pro.net, action_input=action_input)
    folder = out if not action_input else out / "ranking"
    # Cal-QL's term needs the action input: it is the ranking PRO's alone.
    conservative = RANKING_CONSERVATIVE if action_input else 0.0
    pc = dataclasses.replace(config.pro, net=net, conservative=conservative)
    return dataclasses.replace(config, out_dir=str(folder), pro=pc)


def train_pros(config: configs.Config, out: pathlib.Path) -> dict:
    """Both PROs trained on the demonstrations and the fleet's logs; the state-only one's held-out figures
    and its readouts over an example episode (one with a takeover, marked)."""
    shaping, ranking = (pro_config(config, out, action_input=a) for a in (False, True))
    for settings in (shaping, ranking):
        pro_tool.train(settings)
    pro_dir = pro_tool.run_dir(shaping)
    _, held = pro.split_heldout(pro_tool.load_store(shaping), config.pro.heldout)
    heldout = pro_tool.heldout_evaluation(
        pro.load(pro_dir), held, shaping.pro, shaping.target.task, out / "pro_episode.png"
    )
    (pro_dir / "eval.md").write_text(pro_tool.eval_markdown(heldout))
    return {"pro": heldout, "shaping": str(pro_dir), "ranking": str(pro_tool.run_dir(ranking))}


def with_pro_reward(config: configs.Config, pro_dir: str) -> configs.Config:
    return dataclasses.replace(config, patch=dataclasses.replace(config.patch, reward="pro", pro=pro_dir))


def with_risk_trigger(config: configs.Config, pro_dir: str) -> configs.Config:
    """Sparse-reward patching for `demo.trigger_rounds` rounds, its operator also taking over when PRO's ρ
    passes `pro.risk_threshold`."""
    pc = dataclasses.replace(
        config.patch, risk_trigger=config.pro.risk_threshold, pro=pro_dir, rounds=config.demo.trigger_rounds
    )
    return dataclasses.replace(config, patch=pc)


def ranking(config: configs.Config, prior: pretrain.Prior, pro_dir: str) -> dict:
    """The prior with PRO choosing among its deterministic chunk and K - 1 samples, the margin credited to
    its own chunk chosen on the split's validation contexts: one evaluation on the split's test contexts
    and one on `novel`'s (with the same margin)."""
    tc = config.target
    model = pro.load(pro_dir)
    calibrated = pro_tool.calibrated_ranking(config, prior, model, tc.split)
    test = evaluate.TEST.with_episodes(tc.eval_episodes)
    arm = pro_tool.ranked_arm(config.pro, prior, model)
    novel = evaluate.Evaluator(tc.task, "novel", tc.eval_episodes, **arm)
    record = {"kind": "rank", **calibrated.evaluator.on(calibrated.params, test), **calibrated.summary()}
    return {
        "seeds": {ONE_EVALUATION: [record]},
        "novel": {ONE_EVALUATION: novel.on(calibrated.params, test)["success_rate"]},
    }


def with_few_shot_effort(records: list[dict], demos: int, demo_steps: int, sft_wall_s: float) -> list[dict]:
    """RIPT's records with its few-shot SFT stage counted in: the operator's demonstrations (each one
    corrective episode of one segment), their steps and that retraining's wall-clock, spent before
    iteration 0."""
    return [
        {
            **r,
            "corrective_episodes": demos,
            "takeover_segments": demos,
            "takeover_steps": demo_steps,
            "env_steps": r["env_steps"] + demo_steps,
            "wall_s": r["wall_s"] + sft_wall_s,
        }
        for r in records
    ]


# ------------------------------------------------------------------------------------------ the table
COLUMNS = [  # (header, row key, kind)
    ("success (%)", "success", "percent"),
    ("recovery after a first failure (%)", "recovery", "percent"),
    ("retries / episode", "retries", "value"),
    ("cycle time (s)", "cycle_time_s", "value"),
    ("throughput (successes / h)", "throughput", "count"),
    ("corrective episodes", "corrective_episodes", "count"),
    ("takeover segments", "takeover_segments", "count"),
    ("operator steps", "takeover_steps", "count"),
    ("env steps to {goal} (validation)", "env_steps_to_goal", "count"),
    ("wall-clock to {goal} (s)", "wall_s_to_goal", "seconds"),
    ("novel success (%)", "novel", "percent"),
]
NOT_APPLICABLE = "-"
# What an empty cell of an applicable column means.
EMPTY = {
    "recovery": "no failures",
    "cycle_time_s": "no successes",
    "env_steps_to_goal": "not reached",
    "wall_s_to_goal": "not reached",
}
EFFORT = ("corrective_episodes", "takeover_segments", "takeover_steps")


def method_records(stages: dict) -> dict[str, dict[str, list[dict]]]:
    """Every arm's evaluation records per seed, each with the running effort totals."""
    runs = {arm: stages[arm]["seeds"] for arm in ARMS if arm not in ("sft", "targeted_sft", "ript")}
    # SFT's retrainings all start from the prior, at no effort: its evaluation is their common start.
    start = {**stages["prior"]["seeds"][ONE_EVALUATION][0], **patch.ZERO_EFFORT}
    for arm in ("sft", "targeted_sft"):
        runs[arm] = {seed: [start, *recs] for seed, recs in stages[arm]["seeds"].items()}
    ript = stages["ript"]
    runs["ript"] = {
        seed: with_few_shot_effort(
            recs,
            ript["demos"],
            ript["summaries"][seed]["sft_demo_steps"],
            ript["summaries"][seed]["sft_wall_s"],
        )
        for seed, recs in ript["seeds"].items()
    }
    return {arm: runs[arm] for arm in ARMS}  # the table's order


def seed_row(records: list[dict], goal: float, novel: float, *, trained: bool) -> dict:
    """One seed of one arm: its final evaluation and `novel` success; for a trained arm also the effort it
    spent in all and the environment steps and wall-clock until its validation success first reached
    `goal`. A column that does not apply is absent; one without a value is None."""
    final = records[-1]
    row = {
        "success": final["success_rate"],
        "success_ci": final["success_ci"],
        "recovery": final["recovery_rate"],
        "retries": final["retries_per_episode"],
        "cycle_time_s": final["cycle_time_s"],
        "throughput": final["throughput_per_hour"],
        "novel": novel,
        "by_component": final.get("by_component", {}),
    }
    if trained:
        reached = reporting.first_reaching(records, goal, "validation_success")
        row.update({k: final[k] for k in EFFORT})
        for key in ("env_steps", "wall_s", "corrective_episodes"):
            row[f"{key}_to_goal"] = reached[key] if reached else None
    return row


def comparison(stages: dict, goal: float) -> dict[str, list[dict]]:
    """arm -> one row per seed."""
    runs = method_records(stages)
    return {
        arm: [
            seed_row(recs, goal, stages[arm]["novel"][seed], trained=arm not in UNTRAINED)
            for seed, recs in runs[arm].items()
        ]
        for arm in ARMS
    }


def number(value: float, kind: str) -> str:
    return {
        "percent": lambda x: f"{100 * x:.1f}",
        "count": lambda x: f"{x:,.0f}",
        "seconds": lambda x: f"{x:,.0f}",
        "value": lambda x: f"{x:.2f}",
    }[kind](value)


def measured(seeds: list[dict], key: str) -> float | None:
    """The mean over seeds of one column (None where it does not apply or no seed has a value)."""
    values = [s[key] for s in seeds if s.get(key) is not None]
    return float(np.mean(values)) if values else None


def cell(seeds: list[dict], key: str, kind: str) -> str:
    """One table cell: "-" where the column does not apply, what an empty value means where no seed has
    one, else the value (one seed; success with its Wilson 95% interval) or the mean over seeds (success
    with a bootstrap 95% interval, the rest ± std), saying how many seeds when not all have a value."""
    if key not in seeds[0]:
        return NOT_APPLICABLE
    values = [s[key] for s in seeds if s[key] is not None]
    if not values:
        return EMPTY.get(key, NOT_APPLICABLE)
    text = number(float(np.mean(values)), kind)
    if key == "success":
        low, high = seeds[0]["success_ci"] if len(values) == 1 else evaluate.bootstrap_interval(values)
        text += f" [{number(low, kind)}, {number(high, kind)}]"
    elif len(values) > 1:
        text += f" ± {number(float(np.std(values)), kind)}"
    return text + (f" ({len(values)} of {len(seeds)} seeds)" if len(values) < len(seeds) else "")


def table(rows: dict[str, list[dict]], goal: float) -> str:
    headers = [h.format(goal=f"{goal:.0%}") for h, _, _ in COLUMNS]
    lines = ["| method | " + " | ".join(headers) + " |", "|---|" + "---:|" * len(COLUMNS)]
    for arm, seeds in rows.items():
        lines.append(
            f"| {ARMS[arm]} | " + " | ".join(cell(seeds, key, kind) for _, key, kind in COLUMNS) + " |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- the seeds' claims
@dataclasses.dataclass(frozen=True)
class Claim:
    """One headline figure of a seed, and which of our measured figures stands beside it."""

    seed: str
    claim: str
    """In the seed's words, shortened."""
    source: str
    """Where it is stated (under the project's shared folder; docs/seeds.md lists the reports)."""
    theirs: float
    """The figure we measure against (the lower end of a range)."""
    measure: tuple
    """("value", arm, column) | ("ratio", arm, arm, column): the first over the second |
    ("drop", arm, arm, column): 1 - the first over the second."""
    kind: str
    """"percent" or "ratio"."""
    about: bool = False
    """A calibration point (reproduced within ±10%) rather than a level to reach (at least 90% of it)."""


CORTEX_16 = "seeds/cortex-1.6-process-reward-operator.txt, Results"
SEED_CLAIMS = (
    Claim(
        "Cortex 1.5/1.6",
        "the baseline VLA succeeds ~80-82%",
        CORTEX_16,
        0.80,
        ("value", "prior", "success"),
        "percent",
        about=True,
    ),
    Claim(
        "Cortex 1.5",
        "policy patching lifts success to ~95%",
        CORTEX_16,
        0.95,
        ("value", "patch", "success"),
        "percent",
    ),
    Claim(
        "Cortex 1.5",
        "comparable success with 4-5x fewer corrective episodes than full SFT retraining",
        f"{CORTEX_16} (Learning Efficiency; Cortex 1.5's Figure 3)",
        4.0,
        ("ratio", "sft", "patch", "corrective_episodes_to_goal"),
        "ratio",
    ),
    Claim(
        "Cortex 1.6",
        "PRO lifts success to ~98%",
        CORTEX_16,
        0.98,
        ("value", "patch_pro", "success"),
        "percent",
    ),
    Claim(
        "Cortex 1.6",
        "converges ~2x faster than Cortex 1.5 (env steps to the goal)",
        CORTEX_16,
        2.0,
        ("ratio", "patch", "patch_pro", "env_steps_to_goal"),
        "ratio",
    ),
    Claim(
        "Cortex 1.6",
        "recovery after a first failure ~45% (baseline)",
        CORTEX_16,
        0.45,
        ("value", "prior", "recovery"),
        "percent",
        about=True,
    ),
    Claim(
        "Cortex 1.6",
        "recovery -> ~65% (Cortex 1.5)",
        CORTEX_16,
        0.65,
        ("value", "patch", "recovery"),
        "percent",
    ),
    Claim(
        "Cortex 1.6",
        "recovery -> ~80% (Cortex 1.6)",
        CORTEX_16,
        0.80,
        ("value", "patch_pro", "recovery"),
        "percent",
    ),
    Claim(
        "Cortex 1.6",
        "retries per episode fall 30-50% with PRO",
        CORTEX_16,
        0.30,
        ("drop", "patch_pro", "prior", "retries"),
        "percent",
    ),
    Claim(
        "pi*0.6",
        "Recap more than doubles throughput on the hardest tasks",
        "seeds/pi-star-0.6-recap.txt, first paragraph (arXiv 2511.14759)",
        2.0,
        ("ratio", "recap", "prior", "throughput"),
        "ratio",
    ),
    Claim(
        "RIPT-VLA",
        "an SFT model at 4% reaches 97% within 15 iterations",
        "research/seed_methods.md 2.5 (arXiv 2505.17016, abstract)",
        0.97,
        ("value", "ript", "success"),
        "percent",
    ),
)


def ours(claim: Claim, rows: dict[str, list[dict]]) -> float | None:
    """Our figure for `claim`, read from the measured rows (None where we have none)."""
    how, *arms, column = claim.measure
    values = [measured(rows[arm], column) for arm in arms]
    if how == "value":
        return values[0]
    if None in values or not values[1]:
        return None
    return values[0] / values[1] if how == "ratio" else 1.0 - values[0] / values[1]


def verdict(claim: Claim, figure: float | None) -> str:
    if figure is None:
        return "not measured"
    ratio = figure / claim.theirs
    held = 0.9 <= ratio <= 1.1 if claim.about else ratio >= 0.9
    return "reproduced" if held else "not reproduced"


def claim_text(value: float | None, kind: str) -> str:
    if value is None:
        return NOT_APPLICABLE
    return f"{number(value, 'percent')}%" if kind == "percent" else f"{value:.2f}x"


def claims(rows: dict[str, list[dict]]) -> list[dict]:
    out = []
    for claim in SEED_CLAIMS:
        figure = ours(claim, rows)
        out.append(
            {
                **dataclasses.asdict(claim),
                "ours": figure,
                "ratio": figure / claim.theirs if figure is not None else None,
                "verdict": verdict(claim, figure),
            }
        )
    return out


def claims_table(results: list[dict]) -> str:
    lines = [
        "| seed | claim | theirs | ours | ours / theirs | verdict | source |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    for r in results:
        ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else NOT_APPLICABLE
        theirs, figure = claim_text(r["theirs"], r["kind"]), claim_text(r["ours"], r["kind"])
        lines.append(
            f"| {r['seed']} | {r['claim']} | {theirs} | {figure} | {ratio} | {r['verdict']} | {r['source']} |"
        )
    return "\n".join(lines)


def claims_summary(results: list[dict]) -> str:
    """Which claims this run reproduced, which it did not and which it could not measure, in words."""
    parts = []
    for status in ("reproduced", "not reproduced", "not measured"):
        named = [f"{r['seed']}: {r['claim']}" for r in results if r["verdict"] == status]
        parts.append(f"**{status.capitalize()}** ({len(named)}): " + ("; ".join(named) or "none") + ".")
    return "\n\n".join(parts)


# ---------------------------------------------------------------------------------------------- plots
def plot_learning(runs: dict, path: pathlib.Path, title: str) -> None:
    """Success on the test contexts against operator steps and environment steps, every arm and seed; an
    arm without training is one point at zero."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    x_axes = {"takeover_steps": "operator steps", "env_steps": "environment steps"}
    # The arms differ by a few points: the y axis starts just under the lowest success plotted.
    lowest = min(r["success_rate"] for by_seed in runs.values() for recs in by_seed.values() for r in recs)
    for ax, (key, label) in zip(axes, x_axes.items(), strict=True):
        for colour, (arm, by_seed) in enumerate(runs.items()):
            for i, recs in enumerate(by_seed.values()):
                style = {"color": f"C{colour % 10}", "label": ARMS[arm] if i == 0 else None}
                if arm in UNTRAINED:
                    ax.plot([0], [recs[-1]["success_rate"]], "D" if arm == "rank" else "*", ms=9, **style)
                else:
                    # SFT's points are independent retrainings by demo count, joined for reading only.
                    reporting.plot_success(ax, recs, key, **style)
        ax.set_xlabel(label)
        ax.set_xscale("symlog", linthresh=100)
        ax.set_xlim(left=0)
        ax.set_ylim(max(0.0, lowest - 0.05), 1.0)
    axes[0].set_ylabel("success on the test contexts (no operator)")
    axes[0].legend(fontsize=7, loc="upper left")  # high success at little effort: empty in practice
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def component_failures(rows: dict[str, list[dict]]) -> dict[str, dict[str, float | None]]:
    """arm -> component -> the share of the component's test episodes the final policy failed, mean over
    seeds (None where the test contexts hold none of the component)."""
    shares = {}
    for arm, seeds in rows.items():
        shares[arm] = {}
        for name in seeds[0]["by_component"]:
            parts = [s["by_component"][name] for s in seeds if s["by_component"][name]["episodes"]]
            shares[arm][name] = (
                float(np.mean([p["failures"] / p["episodes"] for p in parts])) if parts else None
            )
    return shares


def plot_components(shares: dict[str, dict[str, float]], path: pathlib.Path, title: str) -> None:
    """Grouped bars: per mixture component, the failure share of the prior (before) and each arm's final
    policy (after)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    components = list(shares["prior"])
    width = 0.8 / len(shares)
    fig, ax = plt.subplots(figsize=(12, 5.5))
    for k, (arm, share) in enumerate(shares.items()):
        x = np.arange(len(components)) + (k - (len(shares) - 1) / 2) * width
        ax.bar(
            x,
            [share.get(c) or 0.0 for c in components],
            width,
            color=f"C{k % 10}",
            label=ARMS[arm],
            hatch="//" if arm == "prior" else None,
        )
    ax.set_xticks(np.arange(len(components)), components)
    ax.set_ylabel("failed test episodes of the component")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.08))
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def component_table(shares: dict[str, dict[str, float]], rows: dict[str, list[dict]]) -> list[str]:
    """The component breakdown as a table: failure share per component, and the first seed's failure
    modes."""
    components = list(shares["prior"])
    header = " | ".join(f"{c}: failed (%)" for c in components)
    lines = [
        f"| method | {header} | failure modes (first seed) |",
        "|---|" + "---:|" * len(components) + "---|",
    ]
    for arm, share in shares.items():
        modes = "; ".join(
            f"{name}: " + (", ".join(f"{m} {n}" for m, n in c["failure_modes"].items()) or "none")
            for name, c in rows[arm][0]["by_component"].items()
        )
        cells = [
            number(share[c], "percent") if share.get(c) is not None else "no episodes" for c in components
        ]
        lines.append(f"| {ARMS[arm]} | " + " | ".join(cells) + f" | {modes} |")
    return lines


# --------------------------------------------------------------------------------------------- report
def machine() -> str:
    devices = jax.devices()
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"{len(devices)} {devices[0].platform.upper()} device(s), jax {jax.__version__}, "
        f"Python {platform.python_version()}"
    )


def budgets(config: configs.Config) -> str:
    """What each arm was given, in one paragraph."""
    pc, rc, ri, prc = config.patch, config.recap, config.ript, config.pro
    selects = config.sac.actor == "residual" and config.sac.residual_select
    learner = f"{config.sac.actor} learner" + (
        ", the critic picking prior or patched action" if selects else ""
    )
    return (
        f"Full SFT: the prior retrained by BC ({pc.sft_steps} steps) on {list(pc.sft_demos)} operator "
        f"demonstrations of the split; targeted SFT: the same on demonstrations of its tails. HG-DAgger: "
        f"{pc.hg_dagger_rounds} rounds of {pc.envs_per_round} operator-watched episodes, BC on every "
        f"takeover step. Patching (sparse and PRO reward): {pc.rounds} rounds of {pc.envs_per_round} "
        f"episodes with operator takeovers, {pc.updates_per_round} fused updates each ({learner}), "
        f"gated on the validation contexts; PRO-triggered: {config.demo.trigger_rounds} such "
        f"rounds, the operator also taking over when ρ > {prc.risk_threshold}. Ranking: the prior's "
        f"deterministic chunk and {prc.rank_samples - 1} samples, the best by PRO "
        f"(V - {prc.risk_weight}ρ, Cal-QL α {RANKING_CONSERVATIVE:g}), the deterministic chunk credited a "
        f"margin chosen on the validation contexts among {list(prc.rank_margins)} and ∞ (the prior alone). "
        f"Recap: {rc.iterations} iterations of {rc.autonomous_per_iteration} "
        f"autonomous + {rc.corrected_per_iteration} corrected episodes. RIPT: {ri.iterations} iterations "
        f"of {ri.rollouts_per_iteration} rollouts after BC on {ri.sft_demos} demonstrations (its operator "
        f"effort)."
    )


def fleet_lines(fleet: dict) -> list[str]:
    lines = [
        "| robot | split | operator | episodes | success (%) | with a takeover | retries / episode |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for robot, r in fleet["robots"].items():
        success = "-" if r["success_rate"] is None else number(r["success_rate"], "percent")
        retries = "-" if r["retries_per_episode"] is None else number(r["retries_per_episode"], "value")
        operator = "yes" if r["operator"] else "no"
        lines.append(
            f"| {robot} | {r['split']} | {operator} | {r['episodes']} | {success} | "
            f"{r['with_takeover']} | {retries} |"
        )
    return lines


def stage_lines(stages: dict) -> list[str]:
    """Wall-clock per stage, how much of it went to compiling, how many programs it compiled or loaded
    from the cache, and how many of those it built again (absent in a stage an older version ran)."""
    lines = [
        "| stage | wall-clock (s) | compiling (s) | compiling (%) | programs compiled or loaded "
        "| built again |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, result in stages.items():
        wall, compiling = result["stage_wall_s"], result.get("stage_compile_s")
        seconds = "-" if compiling is None else f"{compiling:,.0f}"
        share = "-" if compiling is None else f"{100 * compiling / wall:.0f}"
        programs = result.get("stage_programs")
        count = "-" if programs is None else f"{sum(programs.values()):,}"
        again = result.get("stage_built_again")
        again = "-" if again is None else ", ".join(f"{n} x {k}" for k, n in again.items()) or "0"
        lines.append(f"| {name} | {wall:,.0f} | {seconds} | {share} | {count} | {again} |")
    wall = sum(r["stage_wall_s"] for r in stages.values())
    compiling = sum(r.get("stage_compile_s", 0.0) for r in stages.values())
    count = sum(sum(r.get("stage_programs", {}).values()) for r in stages.values())
    again = sum(sum(r.get("stage_built_again", {}).values()) for r in stages.values())
    lines.append(
        f"| all | {wall:,.0f} | {compiling:,.0f} | {100 * compiling / wall:.0f} | {count:,} | {again:,} |"
    )
    return lines


GATED = ("patch", "patch_pro", "patch_risk")  # the arms whose rounds pass the validation gate


def gate_lines(stages: dict) -> list[str]:
    """Per gated arm and seed, the rounds whose candidate the gate published and those it held back (the
    deployment then kept the last published params, and the round scores as they did)."""
    lines = ["| arm | seed | published rounds | held back |", "|---|---|---|---|"]
    for arm in GATED:
        for seed, records in stages[arm]["seeds"].items():
            rounds = [r for r in records if r["round"] > 0]
            published = ", ".join(str(r["round"]) for r in rounds if r["published"]) or "none"
            held = ", ".join(str(r["round"]) for r in rounds if not r["published"]) or "none"
            lines.append(f"| {ARMS[arm]} | {seed} | {published} | {held} |")
    return lines


def ranking_text(rank: dict) -> str:
    """The margin PRO's ranking ran with, and the validation successes that chose it."""
    record = rank["seeds"][ONE_EVALUATION][0]
    if "margin" not in record:  # a stage an older version ran
        return "PRO ranking ran with a fixed margin."
    p = record.get("sign_test_p", {})
    tried = ", ".join(
        f"{m}: {100 * s:.1f}%" + (f" (p {p[m]:.2g})" if m in p else "")
        for m, s in record["validation_by_margin"].items()
    )
    alone = (
        " (the prior alone: no margin beat it significantly on validation)"
        if record["margin"] == "inf"
        else ""
    )
    chosen = record["margin"]
    return f"PRO ranking's margin, chosen on the validation contexts: {chosen}{alone}. Tried: {tried}."


def budget_text(stages: dict, wall_s: float, budget_min: float, read_back: list[str] = ()) -> str:
    """This invocation's wall-clock against the budget (only when it ran every stage), and the stages that
    took most of it."""
    total = sum(r["stage_wall_s"] for r in stages.values())
    patching = sum(stages[arm]["stage_wall_s"] for arm in GATED)
    over = wall_s / 60 - budget_min
    if read_back:
        verdict = (
            f"but read {len(read_back)} stages back from an earlier one, so it does not measure the budget"
        )
    else:
        verdict = f"over it by {over:.1f} min" if over > 0 else "within it"
    return (
        f"The budget is {budget_min:.0f} min from a fresh clone, install included (`demo.budget_min`); "
        f"this invocation took {wall_s / 60:.1f} min, {verdict}. The three patching arms took "
        f"{patching:,.0f} s of the stages' {total:,.0f} s ({100 * patching / total:.0f}%): their learner "
        "runs its fused updates and the critic's Monte-Carlo pretraining every round. Stages overlap when "
        "they run in two lanes, so their sum exceeds the wall-clock."
    )


PLOTS = ("learning.png", "components.png", "pro_episode.png")


def report(
    config: configs.Config, stages: dict, out: pathlib.Path, wall_s: float, read_back: list[str] = ()
) -> str:
    """Writes report.md, report.json and the plots; returns both tables."""
    tc, pc, dc = config.target, config.patch, config.demo
    tolerance = patch.gate_tolerance(pc.gate_margin, pc.validation_episodes)
    rows = comparison(stages, pc.goal)
    checked = claims(rows)
    shares = component_failures(rows)
    where = f"{tc.task}/{tc.split}"
    plot_learning(
        method_records(stages),
        out / "learning.png",
        f"{where}: success against operator effort and data, seeds {list(tc.seeds)}",
    )
    after = "each arm's final policy (after)"
    plot_components(
        shares, out / "components.png", f"{where}: failures by component, the prior (before), {after}"
    )
    fleet = stages["fleet"]
    command = "jaxvla demo --full" if config.name == "demo_full" else "jaxvla demo"
    seeds_text = (
        "one seed, a Wilson 95% interval per run"
        if len(tc.seeds) == 1
        else f"seeds {list(tc.seeds)}: mean [bootstrap 95% interval] for success, mean ± std otherwise"
    )
    tables = f"{table(rows, pc.goal)}\n\n{claims_table(checked)}"
    text = "\n".join(
        [
            f"# jaxvla demo: the seeds' methods on {where}",
            "",
            f"`{command}` on {machine()}; {wall_s / 60:.1f} min in this invocation (stages finished by an "
            "earlier one are read back). Every figure is the final policy on the "
            f"{tc.eval_episodes} fixed test contexts (seed {evaluate.TEST.seed}) without the operator, "
            f"{seeds_text}; effort to the goal "
            f"({pc.goal:.0%}) is read on {pc.validation_episodes} validation contexts (seed "
            f"{evaluate.VALIDATION.seed}); `novel` is the stress split, the same test contexts there.",
            "",
            table(rows, pc.goal),
            "",
            '"-": the column does not apply (the prior and ranking are not trained, so they spend no '
            "effort). Corrective episodes, segments and operator steps are the run's totals; environment "
            "steps and wall-clock count up to the first evaluation whose validation success reached the goal "
            "(SFT: the smallest demo count that did; RIPT and SFT count the demonstrations' steps). "
            + budgets(config),
            "",
            "![learning curves](learning.png)",
            "",
            "The validation gate: a round's candidate is published unless its validation success falls "
            f"more than {100 * tolerance:.1f} points below the published params' ({100 * pc.gate_margin:.0f} "
            "at 128 validation contexts, scaled like the binomial standard error).",
            "",
            *gate_lines(stages),
            "",
            ranking_text(stages["rank"]),
            "",
            "## The seeds' claims beside this run",
            "",
            "Ours is read from the table above (mean over seeds). A level is reproduced when ours is at "
            "least 90% of theirs, a calibration point (the baseline's) when it is within ±10%; "
            '"not measured": a figure it needs is missing (the goal never reached, a zero denominator).',
            "",
            claims_table(checked),
            "",
            claims_summary(checked),
            "",
            "## Failures by component, before and after",
            "",
            *component_table(shares, rows),
            "",
            "![failures by component](components.png)",
            "",
            "## The prior deployed through the fleet "
            f"({fleet['stored']} of {fleet['expected']} episodes stored)",
            "",
            f"`jaxvla serve` on {fleet['url']} and {dc.robots} numpy `jaxvla actor` processes (C-MuJoCo "
            "twin, no jax) pushing their episodes over HTTP.",
            "",
            *fleet_lines(fleet),
            "",
            "## PRO on held-out episodes (demonstrations and fleet logs; the state-only PRO)",
            "",
            pro_tool.eval_markdown(stages["pro"]["pro"]).split("\n", 2)[2],  # without its own title
            "![PRO over an episode, the operator's takeover shaded](pro_episode.png)",
            "",
            "## Stages",
            "",
            *stage_lines(stages),
            "",
            budget_text(stages, wall_s, dc.budget_min, read_back),
            "",
        ]
    )
    (out / "report.md").write_text(text)
    payload = {"rows": rows, "claims": checked, "stages": stages, "wall_s": wall_s}
    (out / "report.json").write_text(json.dumps(payload, default=float))
    return tables


# ------------------------------------------------------------------------------------------ command
def with_outputs(config: configs.Config, out: pathlib.Path) -> configs.Config:
    """Points every method at the demo's prior, data and folders, on `target.task` / `target.split`."""
    tc = config.target
    data_dir = str(out / "data") if config.pretrain.data_dir == "data" else config.pretrain.data_dir
    return dataclasses.replace(
        config,
        out_dir=str(out),
        target=dataclasses.replace(tc, prior=str(out / "prior")),
        pretrain=dataclasses.replace(config.pretrain, tasks=(tc.task,), data_dir=data_dir),
        pro=dataclasses.replace(config.pro, collect_split=tc.split),
    )


# Most of a stage's time is XLA compiling its MJX programs, on one core. With `demo.lanes` 2 a second
# process runs the second lane beside the first and keeps the other core busy; the lanes take about equal
# time. Sparse patching goes first there, so its residual programs are in the compilation cache by the time
# the first lane's PRO arms need them. `demo.lanes` 1: one process, every stage in the table's order.
FIRST_LANE = ("fleet", "pro", "rank", "patch_pro", "patch_risk")
SECOND_LANE = ("patch", "sft", "targeted_sft", "hg_dagger", "recap", "ript")
LANE_FLAG = "--second-lane"  # internal: the process that runs SECOND_LANE and exits


def method_stages(config: configs.Config, prior: pretrain.Prior, out: pathlib.Path, done: dict) -> dict:
    """name -> (what, thunk) for every method stage, in the table's order. A thunk that needs an earlier
    stage's result reads it from `done`."""
    tc = config.target
    novel = NovelScore(config, prior)
    # Built once (compiled on first use): both SFT arms, HG-DAgger and every seed share these programs.
    retraining = patch.RetrainPrograms.build(config, prior)
    offline = patch.offline_demonstrations(config)

    def run_recap() -> dict:
        seeds, summaries = recap_tool.run_seeds(config, prior, offline, out / "recap", train_eval=False)
        return {
            "seeds": seeds,
            "summaries": summaries,
            "novel": {seed: s["novel_success"] for seed, s in summaries.items()},
        }

    def run_ript() -> dict:
        seeds, summaries = ript_tool.run_seeds(
            config, prior, out / "ript", train_eval=False, retrain=retraining.retrain
        )
        return {
            "seeds": seeds,
            "summaries": summaries,
            "demos": config.ript.sft_demos,
            "novel": {seed: s["novel_success"] for seed, s in summaries.items()},
        }

    def shaping() -> str:
        return done["pro"]["shaping"]

    def patch_arm(arm_config: configs.Config, name: str) -> dict:
        return patching(arm_config, prior, offline, out / name, novel, retraining.retrain)

    return {
        "fleet": (f"the prior on {tc.split} through the fleet service", lambda: deploy(config, prior, out)),
        "sft": (
            "full SFT retraining",
            lambda: sft_arm(config, prior, offline, novel, retraining, split=tc.split, kind="sft"),
        ),
        "targeted_sft": (
            "targeted SFT on the tails' demonstrations",
            lambda: sft_arm(config, prior, offline, novel, retraining, split="tail", kind="targeted_sft"),
        ),
        "hg_dagger": ("HG-DAgger", lambda: hg_dagger(config, prior, offline, novel, retraining)),
        "patch": ("policy patching, sparse reward", lambda: patch_arm(config, "patch")),
        "pro": (
            "PRO: a state-only and an action-conditioned one, held-out evaluation",
            lambda: train_pros(config, out),
        ),
        "patch_pro": (
            "patching with the PRO reward",
            lambda: patch_arm(with_pro_reward(config, shaping()), "patch_pro"),
        ),
        "patch_risk": (
            "patching with PRO-triggered takeovers",
            lambda: patch_arm(with_risk_trigger(config, shaping()), "patch_risk"),
        ),
        "rank": (
            "the prior's chunks ranked by PRO",
            lambda: ranking(config, prior, done["pro"]["ranking"]),
        ),
        "recap": ("Recap", run_recap),
        "ript": ("RIPT", run_ript),
    }


def start_second_lane(argv: list[str], out: pathlib.Path) -> subprocess.Popen:
    """The second lane's process, its output in `out/second_lane.log`."""
    path = out / "second_lane.log"
    command = [sys.executable, "-m", "tools.demo", *argv, LANE_FLAG]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    print(f"{', '.join(SECOND_LANE)}: in a second process, its progress in {path}", flush=True)
    with path.open("w") as log:  # the child holds its own copy of the file
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)


def wait_for(lane: subprocess.Popen, out: pathlib.Path) -> None:
    print(f"waiting for the second lane ({out / 'second_lane.log'})", flush=True)
    if lane.wait():
        raise RuntimeError(
            f"{PROG}: the second lane failed ({lane.returncode}); see {out / 'second_lane.log'}"
        )


def run(config: configs.Config, argv: list[str] = (), *, second_lane: bool = False) -> str | None:
    """Every stage; returns the two tables (the report is written to `out_dir`). `second_lane`: run only
    SECOND_LANE's stages (the prior is trained already) and return None."""
    out = pathlib.Path(config.out_dir)
    config = with_outputs(config, out)
    pre = config.pretrain
    tic = time.perf_counter()
    stage = Stages(out, total=14)
    results = {"data": stage("data", "scripted demonstrations", lambda: demonstrations(config))}
    results["prior"] = stage(
        "prior", f"pretraining, {pre.steps} BC steps, then scored", lambda: train_prior(config, out)
    )
    methods = method_stages(config, pretrain.load(out / "prior"), out, results)
    if second_lane:
        for name in SECOND_LANE:
            stage(name, *methods[name])
        return None
    lane = start_second_lane(list(argv), out) if config.demo.lanes == 2 else None
    try:
        for name in FIRST_LANE if lane is not None else methods:
            results[name] = stage(name, *methods[name])
        if lane is not None:
            wait_for(lane, out)
    finally:
        if lane is not None and lane.poll() is None:  # this lane failed or was interrupted: stop the other
            lane.terminate()
    results = {
        name: stage(name, *methods[name]) if name not in results else results[name]
        for name in ("data", "prior", *methods)
    }
    results = json.loads(json.dumps(results, default=float))  # seeds as JSON keys, whether run or read back
    print(f"\n[{stage.total}/{stage.total}] report", flush=True)
    return report(config, results, out, time.perf_counter() - tic, stage.read_back)


def main(argv: list[str]) -> int:
    second_lane = LANE_FLAG in argv
    argv = [a for a in argv if a != LANE_FLAG]
    full = "--full" in argv
    config = configs.cli(
        ["demo_full" if full else "demo", *(a for a in argv if a != "--full")], PROG, sections=SECTIONS
    )
    compile_cache.enable(config.compile_cache)
    tic = time.perf_counter()
    tables = run(config, argv, second_lane=second_lane)
    if second_lane:
        return 0
    out = pathlib.Path(config.out_dir)
    print(tables)
    written = ", ".join(str(out / name) for name in ("report.md", "report.json", *PLOTS))
    print(f"\nwrote {written} in {(time.perf_counter() - tic) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
