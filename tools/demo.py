"""`jaxvla demo [--full] [--section.field value ...]`: the main job, every method compared end to end.

From nothing but this repository, on `patch.task` / `patch.split` (the split the prior fails on):

 1. data     scripted-operator demonstrations: `train` for the prior, the split's for the SFT arm
 2. prior    the foundation prior, by behaviour cloning (`pretrain.*`)
 3. fleet    the prior deployed through the fleet on loopback: `jaxvla serve` and `demo.robots` numpy
             `jaxvla actor` processes (C-MuJoCo twins): one on `train`, the others on the split, the
             last of them with the operator; their logs are PRO's deployment data
 4. sft      full SFT retraining on the split's demonstrations (`patch.sft_demos`)
 5. patch    policy patching with the operator's sparse reward
 6. pro      PRO trained on demonstrations and fleet logs, evaluated on held-out episodes; patching with
             its dense reward
 7. recap    Recap
 8. ript     RIPT from a few-shot SFT start (`ript.sft_demos`)
 9. report   the comparison table (the Cortex 1.6 results' form), plots and `report.md`

Everything lands in `out_dir` (`runs/demo`, or `runs/demo_full` with `--full`: larger budgets, three
seeds, mean ± std). Each finished stage leaves `stages/<name>.json`, so a rerun skips it and an
interrupted run resumes where it stopped.
"""

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
from envs import demos as operator_demos
from jaxvla import episodes as rlds
from jaxvla import export
from learner import compile_cache
from learner import patch
from learner import pretrain
from learner import pro
from learner.fleet.store import EpisodeStore
from learner.fleet.store import ParamsRegistry
from tools import pro as pro_tool
from tools import recap as recap_tool
from tools import ript as ript_tool
from tools import serve as serve_tool

PROG = "jaxvla demo"
METHODS = {  # stage -> row label, in the table's order
    "prior": "prior",
    "sft": "full SFT retraining",
    "patch": "policy patching",
    "patch_pro": "patching with PRO reward",
    "recap": "Recap",
    "ript": "RIPT (from a few-shot SFT)",
}
# The seeds' claims the report measures against (their sources: docs/seeds.md).
CLAIMS = {
    "patch": "Cortex 1.5: patching reaches >= 95% on the failure configurations with >= 4x fewer operator "
    "interventions than full SFT retraining",
    "patch_pro": "Cortex 1.6: PRO's dense reward converges >= 2x faster than the sparse reward",
    "recap": "pi*0.6: Recap more than doubles throughput on the hardest tasks",
    "ript": "RIPT-VLA: a few-shot SFT policy goes from a low success rate to above 90% in 15 iterations",
}


# ------------------------------------------------------------------------------------------- stages
class Stages:
    """Runs named stages once: a finished stage's JSON result is kept in `stages/` and read back."""

    def __init__(self, out: pathlib.Path, total: int):
        self.folder, self.total, self.done = out / "stages", total, 0
        self.folder.mkdir(parents=True, exist_ok=True)
        self.tic = time.perf_counter()

    def __call__(self, name: str, what: str, fn) -> dict:
        """The stage's result: read back if an earlier run finished it, else run now."""
        self.done += 1
        path = self.folder / f"{name}.json"
        elapsed = time.perf_counter() - self.tic
        if path.exists():
            print(f"[{self.done}/{self.total}] {name}: done in an earlier run ({path})", flush=True)
            return json.loads(path.read_text())
        print(f"\n[{self.done}/{self.total}] {name}: {what}  (elapsed {elapsed / 60:.1f} min)", flush=True)
        tic = time.perf_counter()
        result = fn()
        result["stage_wall_s"] = time.perf_counter() - tic
        path.write_text(json.dumps(result, indent=1, default=float))
        return result


def demonstrations(config: configs.Config) -> dict:
    pc, pre = config.patch, config.pretrain
    noise = {"noise": pre.demo_noise, "bursts": pre.demo_bursts}
    train_count = max(pre.demos_per_task, pc.offline_episodes)
    split_count = max(*pc.sft_demos, config.ript.sft_demos)
    train = operator_demos.load_or_generate(pre.data_dir, pc.task, "train", train_count, seed=pre.seed,
                                            **noise)  # fmt: skip
    split = operator_demos.load_or_generate(pre.data_dir, pc.task, pc.split, split_count, seed=pre.seed + 1,
                                            **noise)  # fmt: skip
    return {"train": len(train), pc.split: len(split),
            "train_success": float(np.mean([ep["episode_metadata"]["success"] for ep in train]))}  # fmt: skip


def train_prior(config: configs.Config, out: pathlib.Path) -> dict:
    pc, pre = config.patch, config.pretrain
    demos = operator_demos.load_or_generate(pre.data_dir, pc.task, "train", pre.demos_per_task, seed=pre.seed)
    return {"step": pretrain.train(config, demos, out / "prior").step}


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
    dc, pc = config.demo, config.patch
    root = out / "fleet"
    fleet = dataclasses.replace(
        config.fleet, root=str(root), robots=dc.robots, port=free_port(), learner=False
    )
    registry = ParamsRegistry(root / "params")
    if registry.latest() is None:
        path = export.write(root / "prior.msgpack", prior.config.model, prior.params, prior.stats,
                            version=prior.step, parent_version=None, config_hash="demo")  # fmt: skip
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
        service = subprocess.Popen([sys.executable, "-m", "tools.serve", *serve_args], stdout=serve_out,
                                   stderr=subprocess.STDOUT, env=env)  # fmt: skip
    try:
        wait_healthy(url, service)
        actors = []
        for i, (split, operator) in enumerate(robot_roles(dc.robots, pc.split)):
            command = [sys.executable, "-m", "tools.actor", "--url", url, "--robot-id", f"robot-{i}",
                       "--token-file", str(tokens), "--task", pc.task, "--split", split,
                       "--episodes", str(dc.episodes_per_robot), "--hz", "0", "--seed", str(100_000 * i),
                       "--folder", str(root / f"robot-{i}"), "--log", str(logs / f"robot-{i}.jsonl"),
                       *(["--operator"] if operator else [])]  # fmt: skip
            with (logs / f"robot-{i}.out").open("w") as actor_out:
                actors.append(subprocess.Popen(command, stdout=actor_out, stderr=subprocess.STDOUT, env=env))
        watch_actors(actors, logs, dc.robots * dc.episodes_per_robot)
    finally:
        service.terminate()
        service.wait(timeout=60)
    episodes = [episode for _, episode in EpisodeStore(root / "store").read_since(-1)]
    logged = pathlib.Path(config.pretrain.data_dir) / "pro" / f"{pc.task}_fleet"
    rlds.write_episodes(logged, episodes, overwrite=True)
    expected = dc.robots * dc.episodes_per_robot
    return {
        "url": url,
        "robots": fleet_summary(episodes, robot_roles(dc.robots, pc.split)),
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
def sft(config: configs.Config, prior: pretrain.Prior, offline: list[dict]) -> dict:
    pc, pre = config.patch, config.pretrain
    demos = operator_demos.load_or_generate(pre.data_dir, pc.task, pc.split, max(pc.sft_demos),
                                            seed=pre.seed + 1, noise=pre.demo_noise,
                                            bursts=pre.demo_bursts)  # fmt: skip
    return {"seeds": {seed: patch.run_sft(config, prior, demos, offline, seed=seed)[0] for seed in pc.seeds}}


def patching(config: configs.Config, prior: pretrain.Prior, offline: list[dict], out: pathlib.Path) -> dict:
    seeds = {}
    for seed in config.patch.seeds:
        seeds[seed], _ = patch.run_patching(config, prior, offline, out / f"seed{seed}", seed=seed)
    return {"seeds": seeds}


def pro_and_patching(config: configs.Config, prior: pretrain.Prior, offline: list[dict],
                     out: pathlib.Path) -> dict:  # fmt: skip
    """PRO trained on the demonstrations and the fleet's logs, its held-out figures, then patching with
    its reward."""
    pro_dir = pro_tool.run_dir(config)
    pro_tool.train(config)
    _, held = pro.split_heldout(pro_tool.load_store(config), config.pro.heldout)
    heldout = pro_tool.heldout_evaluation(pro.load(pro_dir), held, config.pro, out / "pro_episode.png")
    (pro_dir / "eval.md").write_text(pro_tool.eval_markdown(heldout))
    dense = dataclasses.replace(
        config, patch=dataclasses.replace(config.patch, reward="pro", pro=str(pro_dir))
    )
    return {"pro": heldout, **patching(dense, prior, offline, out / "patch_pro")}


# ------------------------------------------------------------------------------------------- report
def converged_at(records: list[dict], fraction: float) -> dict | None:
    """The first evaluation within `fraction` of the run's best success, if the run improved at all."""
    best = max(r["success_rate"] for r in records)
    if best <= records[0]["success_rate"]:
        return None
    return next(r for r in records if r["success_rate"] >= fraction * best)


def method_row(records: list[dict], fraction: float) -> dict:
    """One seed of one method: its final evaluation, the operator effort it used, and what it spent to
    converge. SFT's records are independent retrainings by demo count: its "final" is the largest, its
    wall-clock that retraining's alone."""
    final = records[-1]
    at = converged_at(records, fraction)
    return {
        "success": final["success_rate"],
        "recovery": final["recovery_rate"],
        "retries": final["retries_per_episode"],
        "cycle_time_s": final["cycle_time_s"],
        "throughput": final["throughput_per_hour"],
        "interventions": final.get("corrective_episodes", 0),
        "takeover_steps": final.get("takeover_steps", 0),
        "env_steps_to_converge": at["env_steps"] if at else None,
        "wall_s_to_converge": at["wall_s"] if at else None,
    }


def method_records(stages: dict) -> dict[str, dict[int, list[dict]]]:
    """Every method's evaluation records per seed, in one form: success and the running totals."""
    runs = {
        "prior": {seed: recs[:1] for seed, recs in stages["patch"]["seeds"].items()},
        # SFT's retrainings all start from the prior: its evaluation is their common start.
        "sft": {
            seed: recs[:1] + stages["sft"]["seeds"][seed] for seed, recs in stages["patch"]["seeds"].items()
        },
        "patch": stages["patch"]["seeds"],
        "patch_pro": stages["pro"]["seeds"],
        "recap": stages["recap"]["seeds"],
        "ript": {},
    }
    for seed, recs in stages["ript"]["seeds"].items():
        # RIPT's operator effort is its SFT stage's demonstrations, spent before iteration 0.
        demos, steps = stages["ript"]["demos"], stages["ript"]["summaries"][seed]["sft_demo_steps"]
        runs["ript"][seed] = [{**r, "corrective_episodes": demos, "takeover_steps": steps} for r in recs]
    return runs


def fmt(values: list, kind: str) -> str:
    """Mean ± std over the seeds that have a value; says how many when some have none (never converged)."""
    seeds, values = len(values), [v for v in values if v is not None]
    if not values:
        return "-"
    mean, std = float(np.mean(values)), float(np.std(values))
    text = {
        "percent": lambda x: f"{100 * x:.1f}",
        "count": lambda x: f"{x:,.0f}",
        "seconds": lambda x: f"{x:,.0f}",
        "value": lambda x: f"{x:.2f}",
    }[kind]
    spread = f" ± {text(std)}" if len(values) > 1 else ""
    return text(mean) + spread + (f" ({len(values)} of {seeds} seeds)" if len(values) < seeds else "")


COLUMNS = [  # (header, row key, kind)
    ("success (%)", "success", "percent"),
    ("recovery after a first failure (%)", "recovery", "percent"),
    ("retries / episode", "retries", "value"),
    ("cycle time (s)", "cycle_time_s", "value"),
    ("throughput (successes / h)", "throughput", "count"),
    ("operator interventions (episodes)", "interventions", "count"),
    ("operator takeover steps", "takeover_steps", "count"),
    ("env steps to converge", "env_steps_to_converge", "count"),
    ("wall-clock to converge (s)", "wall_s_to_converge", "seconds"),
]


def comparison(runs: dict, fraction: float) -> dict[str, list[dict]]:
    return {
        method: [method_row(recs, fraction) for recs in by_seed.values()] for method, by_seed in runs.items()
    }


def table(rows: dict[str, list[dict]]) -> str:
    lines = ["| method | " + " | ".join(h for h, _, _ in COLUMNS) + " |",
             "|---|" + "---:|" * len(COLUMNS)]  # fmt: skip
    for method, seeds in rows.items():
        cells = [fmt([s[key] for s in seeds], kind) for _, key, kind in COLUMNS]
        lines.append(f"| {METHODS[method]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_learning(runs: dict, path: pathlib.Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 4.5))
    x_axes = {"env_steps": "environment steps", "takeover_steps": "operator takeover steps (interventions)"}
    for ax, (key, label) in zip(axes, x_axes.items(), strict=True):
        for k, (method, by_seed) in enumerate(runs.items()):
            for i, recs in enumerate(by_seed.values()):
                x = [r.get(key, 0) for r in recs]
                y = [r["success_rate"] for r in recs]
                style = "s" if method in ("prior", "sft") else "-o"  # SFT: independent retrainings
                name = METHODS[method] if i == 0 else None
                ax.plot(x, y, style, color=f"C{k}", ms=4, alpha=0.8, label=name)
        ax.set_xlabel(label)
        ax.set_xscale("symlog", linthresh=100)
        ax.set_xlim(left=0)
        ax.set_ylim(-0.02, 1.02)
    axes[0].set_ylabel("success on the split (no operator)")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def shortfalls(rows: dict[str, list[dict]], runs: dict) -> list[str]:
    """What the seeds claim next to what this run measured, in words."""

    def mean(method: str, key: str) -> float:
        return float(np.mean([r[key] for r in rows[method] if r[key] is not None] or [np.nan]))

    def best(method: str) -> float:
        return float(np.mean([max(r["success_rate"] for r in recs) for recs in runs[method].values()]))

    def steps(method: str) -> str:
        values = [r["env_steps_to_converge"] for r in rows[method]]
        return fmt(values, "count") if any(v is not None for v in values) else "none (no gain)"

    ript_start = np.mean([recs[0]["success_rate"] for recs in runs["ript"].values()])
    return [
        f"- {CLAIMS['patch']}. Here: best {best('patch'):.0%}, final {mean('patch', 'success'):.0%} with "
        f"{mean('patch', 'interventions'):.0f} corrective episodes; full SFT reached "
        f"{mean('sft', 'success'):.0%} with {mean('sft', 'interventions'):.0f} demonstrations.",
        f"- {CLAIMS['patch_pro']}. Here: environment steps to converge "
        f"{steps('patch_pro')} with PRO's reward against {steps('patch')} with the sparse one; best success "
        f"{best('patch_pro'):.0%} against {best('patch'):.0%}.",
        f"- {CLAIMS['recap']}. Here: throughput {mean('prior', 'throughput'):.0f} -> "
        f"{mean('recap', 'throughput'):.0f} successes/h (the prior fails the split, so a ratio says "
        f"nothing); success {mean('recap', 'success'):.0%}.",
        f"- {CLAIMS['ript']}. Here: {ript_start:.0%} after SFT -> {mean('ript', 'success'):.0%} "
        f"(best {best('ript'):.0%}).",
    ]


def machine() -> str:
    devices = jax.devices()
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
            f"{len(devices)} {devices[0].platform.upper()} device(s), jax {jax.__version__}, "
            f"Python {platform.python_version()}")  # fmt: skip


def report(config: configs.Config, stages: dict, out: pathlib.Path, wall_s: float) -> str:
    runs = method_records(stages)
    rows = comparison(runs, config.demo.converged)
    plot_learning(runs, out / "learning.png", f"{config.patch.task}/{config.patch.split}: success against "
                  f"data and operator effort, seeds {list(config.patch.seeds)}")  # fmt: skip
    pc, dc = config.patch, config.demo
    fleet = stages["fleet"]
    robot_lines = []
    for robot, r in fleet["robots"].items():
        success, retries = fmt([r["success_rate"]], "percent"), fmt([r["retries_per_episode"]], "value")
        operator = "yes" if r["operator"] else "no"
        robot_lines.append(f"| {robot} | {r['split']} | {operator} | {r['episodes']} | {success} | "
                           f"{r['with_takeover']} | {retries} |")  # fmt: skip
    stage_lines = [f"| {name} | {result['stage_wall_s']:,.0f} |" for name, result in stages.items()]
    command = "jaxvla demo --full" if config.name == "demo_full" else "jaxvla demo"
    text = "\n".join([
        f"# jaxvla demo: the seeds' methods on {pc.task}/{pc.split}",
        "",
        f"`{command}` on {machine()}; {wall_s / 60:.1f} min in this invocation (stages finished by an "
        f"earlier one are read back). Seeds {list(pc.seeds)}; "
        f"every success figure is an MJX evaluation of {pc.eval_episodes} episodes without the operator; "
        "mean ± std over seeds.",
        "",
        table(rows),
        "",
        f"Converged: the first evaluation within {dc.converged:.0%} of the run's best success (\"-\": never "
        "above its start). Prior: the pretrained policy. Full SFT: the prior retrained by BC on "
        f"{max(pc.sft_demos)} operator demonstrations of the split; its environment steps are theirs. "
        f"Patching: {pc.rounds} rounds of {pc.envs_per_round} episodes with operator takeovers, "
        f"{pc.updates_per_round} SAC steps each. PRO: the same with PRO's dense reward. Recap: "
        f"{config.recap.iterations} iterations. RIPT: {config.ript.iterations} iterations after BC on "
        f"{config.ript.sft_demos} demonstrations (its interventions).",
        "",
        "![learning curves](learning.png)",
        "",
        "## Where this falls short of the seeds",
        "",
        *shortfalls(rows, runs),
        "",
        f"## The prior deployed through the fleet ({fleet['stored']} of {fleet['expected']} episodes stored)",
        "",
        f"`jaxvla serve` on {fleet['url']} and {dc.robots} numpy `jaxvla actor` processes (C-MuJoCo twin, "
        "no jax) pushing their episodes over HTTP.",
        "",
        "| robot | split | operator | episodes | success (%) | with a takeover | retries / episode |",
        "|---|---|---|---:|---:|---:|---:|",
        *robot_lines,
        "",
        "## PRO on held-out episodes (demonstrations and fleet logs)",
        "",
        pro_tool.eval_markdown(stages["pro"]["pro"]).split("\n", 2)[2],  # without its own title
        "![PRO over an episode](pro_episode.png)",
        "",
        "## Stages",
        "",
        "| stage | wall-clock (s) |",
        "|---|---:|",
        *stage_lines,
        "",
    ])  # fmt: skip
    (out / "report.md").write_text(text)
    (out / "report.json").write_text(
        json.dumps({"rows": rows, "stages": stages, "wall_s": wall_s}, default=float)
    )
    return table(rows)


# ------------------------------------------------------------------------------------------ command
def with_outputs(config: configs.Config, out: pathlib.Path) -> configs.Config:
    """Points every method at the demo's prior, data and folders."""
    prior = str(out / "prior")
    data_dir = str(out / "data") if config.pretrain.data_dir == "data" else config.pretrain.data_dir
    return dataclasses.replace(
        config,
        out_dir=str(out),
        pretrain=dataclasses.replace(config.pretrain, tasks=(config.patch.task,), data_dir=data_dir),
        patch=dataclasses.replace(config.patch, prior=prior),
        pro=dataclasses.replace(config.pro, prior=prior, task=config.patch.task),
        recap=dataclasses.replace(
            config.recap, prior=prior, task=config.patch.task, split=config.patch.split
        ),
        ript=dataclasses.replace(config.ript, prior=prior, task=config.patch.task, split=config.patch.split),
    )


def run(config: configs.Config) -> str:
    """Every stage; returns the comparison table (the report is written to `out_dir`)."""
    out = pathlib.Path(config.out_dir)
    config = with_outputs(config, out)
    pc, pre = config.patch, config.pretrain
    tic = time.perf_counter()
    stage = Stages(out, total=9)
    results = {"data": stage("data", "scripted demonstrations", lambda: demonstrations(config))}
    results["prior"] = stage("prior", f"pretraining, {pre.steps} BC steps", lambda: train_prior(config, out))
    prior = pretrain.load(out / "prior")
    offline = operator_demos.load_or_generate(pre.data_dir, pc.task, "train", pc.offline_episodes,
                                              seed=pre.seed)  # fmt: skip
    results["fleet"] = stage("fleet", f"the prior on {pc.split} through the fleet service",
                             lambda: deploy(config, prior, out))  # fmt: skip
    results["sft"] = stage("sft", "full SFT retraining", lambda: sft(config, prior, offline))
    results["patch"] = stage("patch", "policy patching, sparse reward",
                             lambda: patching(config, prior, offline, out / "patch"))  # fmt: skip
    results["pro"] = stage("pro", "PRO: train, held-out evaluation, patching with its reward",
                           lambda: pro_and_patching(config, prior, offline, out))  # fmt: skip

    def run_recap() -> dict:
        seeds, summaries = recap_tool.run_seeds(config, prior, offline, out / "recap", train_eval=False)
        return {"seeds": seeds, "summaries": summaries}

    def run_ript() -> dict:
        seeds, summaries = ript_tool.run_seeds(config, prior, out / "ript", train_eval=False)
        return {"seeds": seeds, "summaries": summaries, "demos": config.ript.sft_demos}

    results["recap"] = stage("recap", "Recap", run_recap)
    results["ript"] = stage("ript", "RIPT", run_ript)
    results = json.loads(json.dumps(results, default=float))  # seeds as JSON keys, whether run or read back
    print(f"\n[{stage.total}/{stage.total}] report", flush=True)
    return report(config, results, out, time.perf_counter() - tic)


def main(argv: list[str]) -> int:
    full = "--full" in argv
    config = configs.cli(["demo_full" if full else "demo", *(a for a in argv if a != "--full")], prog=PROG)
    compile_cache.enable(config.compile_cache)
    tic = time.perf_counter()
    summary = run(config)
    out = pathlib.Path(config.out_dir)
    print(summary)
    print(f"\nwrote {out / 'report.md'}, {out / 'learning.png'}, {out / 'pro_episode.png'} "
          f"in {(time.perf_counter() - tic) / 60:.1f} min")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
