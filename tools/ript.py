"""`jaxvla ript [config] [--ript.field value ...]`: RIPT-VLA from the prior on `deploy`, and from few-shot
SFT starts on `novel`.

Loads the prior from `target.prior`. For each start in `ript.starts` (demonstration counts; 0 is the prior
itself on `target.split`, N > 0 the prior after BC on N operator demonstrations of `ript.few_shot_split`, the
paper's few-shot SFT stage, then RIPT on that split), and for every seed in `target.seeds`, runs
`learner.ript.run_ript`. With `ript.starts` empty, one start: `ript.sft_demos` on `target.split`.
Writes to `out_dir/ript-<task>/<start>/`: `report.json` (every iteration of every seed), `report.md`
(the headline with intervals, each seed, the iterations with their clip fraction and groups kept),
`ript.png` and one `seed<N>/metrics.jsonl` per seed; with several starts also `out_dir/ript-<task>/report.md`
with one line per start.
"""

import dataclasses
import json
import pathlib
import sys
import time

import jax
import numpy as np

import configs
import envs
from learner import compile_cache
from learner import dataset
from learner import evaluate
from learner import patch
from learner import pretrain
from learner import ript
from tools import reporting

PROG = "jaxvla ript"
# This command's defaults where they differ from the named config's (which `jaxvla demo` also reads): the
# three starts of issue 21, 8 PPO epochs at a rate the RL std can carry, 64 test contexts, and few-shot SFT
# that sees its demonstrations in half of its examples (1 `novel` demonstration: sampled rollouts succeed
# 13% at std 0.02, against 4% with the demonstration as 0.5% of the examples).
DEFAULTS = {
    "target": {"eval_episodes": 64},
    "ript": {"starts": (0, 1, 4), "epochs": 8, "learning_rate": 1e-5, "sft_share": 0.5},
}
# What it reads: `patch.offline_episodes` and `pretrain` for the few-shot SFT starts.
SECTIONS = ("target", "ript", "patch", "pretrain")

ROWS = [
    ("rollouts", "rollouts", "count"),
    ("groups kept by dynamic sampling, whole run (%)", "kept_share", "percent"),
    ("iterations with an update", "updates", "value"),
    ("clip fraction, mean over iterations", "clip_fraction", "value"),
    ("success on `train` afterwards (%)", "train_success", "percent"),
    ("SFT stage wall-clock (s)", "sft_wall_s", "value"),
]
COLUMNS = [
    ("sampled rollouts succeeding (%)", "rollout_success", "percent"),
    ("groups kept (%)", "kept_fraction", "percent"),
    ("clip fraction", "clip_fraction", "value"),
    ("KL to start", "kl", "value"),
    ("RL std", "std", "value"),
    ("largest |ratio - 1|", "max_ratio_deviation", "value"),
]


def describe(config: configs.Config) -> str:
    """The run's settings in one paragraph, for the report."""
    tc, rc = config.target, config.ript
    start = "the prior"
    if rc.sft_demos:
        start = f"the prior after BC on {rc.sft_demos} demonstrations ({rc.sft_share:.0%} of SFT examples)"
    return (
        f"RIPT on {tc.task}/{tc.split} from {start}, seeds {list(tc.seeds)}: {rc.iterations} iterations of "
        f"{rc.rollouts_per_iteration} rollouts ({rc.contexts} contexts, K = {rc.group_size} per context, "
        f"{rc.groups_per_call} contexts per call), {rc.epochs} PPO epochs of {rc.minibatches} steps (clip "
        f"{rc.clip_low}/{rc.clip_high}, lr {rc.learning_rate}, KL {rc.kl_coef} to the start, loss averaged "
        f"per rollout); RL std {rc.rl_std} per action dimension (floor {rc.rl_std_floor}, lr "
        f"{rc.std_learning_rate}), x{rc.temperature} while sampling, {rc.execute} action(s) of each chunk "
        f"executed; {tc.eval_episodes} test contexts per evaluation (mean chunk, receding horizon)."
    )


def few_shot_demos(config: configs.Config) -> tuple[list[dict], list[dict]]:
    """The few-shot stage's data: (`ript.sft_demos` operator demonstrations of `target.split`, the task's
    `train` demonstrations), both empty for a start from the prior."""
    tc, rc = config.target, config.ript
    if not rc.sft_demos:
        return [], []
    return patch.demonstrations(config, tc.split, rc.sft_demos), patch.offline_demonstrations(config)


def group_collector(config: configs.Config, prior) -> ript.GroupCollector:
    """The K-rollouts-per-context collector of `target`'s task and split, on the prior's network."""
    tc, rc = config.target, config.ript
    return ript.GroupCollector(
        tc.task,
        tc.split,
        rc.groups_per_call,
        rc.group_size,
        prior.graphdef,
        prior.stats,
        execute=rc.execute,
        likelihood=ript.likelihood_of(config),
    )


def few_shot_copies(few: int, offline: int, share: float) -> int:
    """How many copies of the `few` few-shot examples make them `share` of the SFT data beside `offline`
    examples: share / (1 - share) * offline / few, rounded, at least 1 (share 0: one copy)."""
    return max(1, round(share / (1.0 - share) * offline / few))


def few_shot_start(config: configs.Config, prior, retrain, demos: tuple[list, list], seed: int):
    """The start's network params: the prior's, or after BC on the few-shot demonstrations (repeated to
    `ript.sft_share` of the examples) plus the offline ones (`retrain`: a `patch.Retrainer`)."""
    if not config.ript.sft_demos:
        return prior.params
    chunk = prior.model.chunk
    few, offline = (dataset.flatten(episodes, chunk) for episodes in demos)
    copies = few_shot_copies(len(few["chunk"]), len(offline["chunk"]), config.ript.sft_share)
    sft_data = dataset.concatenate(*[few] * copies, offline)
    return jax.block_until_ready(retrain(sft_data, seed=seed))


def run_seeds(
    config: configs.Config,
    prior,
    out: pathlib.Path,
    *,
    train_eval: bool = True,
    novel_eval: bool = True,
    retrain: patch.Retrainer | None = None,
) -> tuple[dict, dict]:
    """RIPT from `prior` (after its few-shot SFT stage, if any) once per seed in `target.seeds`: every
    seed's records and its summary (with the final policy's success on `train` when `train_eval`, on the
    `novel` test contexts when `novel_eval`). `retrain`: the few-shot SFT's BC retraining, if one of the
    same config and prior is built already (the demo's baselines')."""
    tc, rc = config.target, config.ript
    if not 1 <= rc.execute <= prior.model.chunk:
        raise SystemExit(
            f"{PROG}: ript.execute={rc.execute} must lie in 1..{prior.model.chunk}, the prior's chunk length"
        )
    demos = few_shot_demos(config)
    collector = group_collector(config, prior)
    actor = evaluate.chunk_actor(prior.graphdef, prior.stats)
    evaluator, on_train, on_novel = evaluate.run_evaluators(
        tc.task, tc.split, tc.eval_episodes, actor, train_eval=train_eval, novel_eval=novel_eval
    )
    test = evaluate.TEST.with_episodes(tc.eval_episodes)
    if rc.sft_demos and retrain is None:
        retrain = patch.Retrainer(config, prior)
    results, summaries = {}, {}
    for seed in tc.seeds:
        tic = time.perf_counter()
        start = few_shot_start(config, prior, retrain, demos, seed)
        sft_s = time.perf_counter() - tic
        key_contexts = jax.random.fold_in(jax.random.key(seed), 1_000_003)
        contexts = jax.vmap(collector.env.sample_params)(jax.random.split(key_contexts, rc.contexts))
        records, params = ript.run_ript(
            config,
            prior,
            start,
            seed=seed,
            collector=collector,
            evaluator=evaluator,
            contexts=contexts,
            run_dir=out / f"seed{seed}",
        )
        results[seed] = records
        updated = [r for r in records[1:] if "clip_fraction" in r]
        summaries[seed] = {
            **reporting.seed_summary(records, ("rollouts", "kept_groups", "groups", "updates")),
            "kept_share": records[-1]["kept_groups"] / max(records[-1]["groups"], 1),
            "clip_fraction": sum(r["clip_fraction"] for r in updated) / len(updated) if updated else None,
            "sft_wall_s": sft_s,
            "sft_demo_steps": int(sum(len(ep["steps"]["action"]) for ep in demos[0])),
            "train_success": on_train.on(params, test)["success_rate"] if train_eval else None,
            "novel_success": on_novel.on(params, test)["success_rate"] if novel_eval else None,
        }
        print({"seed": seed, **summaries[seed]}, flush=True)
    return results, summaries


def probe_stds(config: configs.Config, prior, stds: tuple[float, ...]) -> list[dict]:
    """The start (the prior, or its few-shot SFT, seed 0), sampled at each RL std (one compiled collector:
    the std is a param): per std, the share of sampled rollouts that succeed and of groups whose outcomes
    differ (those dynamic sampling keeps), overall and per component of the split's mixture."""
    tc, rc = config.target, config.ript
    retrain = patch.Retrainer(config, prior) if rc.sft_demos else None
    start = few_shot_start(config, prior, retrain, few_shot_demos(config), seed=0)
    collector = group_collector(config, prior)
    contexts = jax.vmap(collector.env.sample_params)(jax.random.split(jax.random.key(0), rc.contexts))
    used = rc.contexts // rc.groups_per_call * rc.groups_per_call
    component = np.asarray(contexts.component)[:used]
    names = envs.get_task(tc.task).split(tc.split).component_names
    rows = []
    for std in stds:
        params = ript.rl_params(start, prior.model.action_size, std)
        rewards = []
        for call in range(rc.contexts // rc.groups_per_call):
            index = np.arange(call * rc.groups_per_call, (call + 1) * rc.groups_per_call)
            out = collector(params, ript.select(contexts, index), jax.random.key(call))
            rewards.append(np.asarray(out["success"]).reshape(rc.groups_per_call, rc.group_size))
        rewards = np.concatenate(rewards).astype(np.float32)  # [C, K]
        rows.append(
            {
                "std": std,
                **group_figures(rewards),
                "by_component": {
                    name: group_figures(rewards[component == i]) for i, name in enumerate(names)
                },
            }
        )
        print(rows[-1], flush=True)
    return rows


def group_figures(rewards: np.ndarray) -> dict:
    """rewards [C, K] of C groups: the share of rollouts that succeed, of groups dynamic sampling keeps
    (outcomes differ) and of groups that all fail."""
    if not len(rewards):
        return {"contexts": 0}
    return {
        "contexts": len(rewards),
        "rollout_success": float(rewards.mean()),
        "kept_fraction": float(np.mean(ript.informative_groups(rewards))),
        "all_fail_fraction": float(np.mean(np.all(rewards == 0, axis=1))),
    }


def start_config(config: configs.Config, demos: int) -> configs.Config:
    """The config of one start: the prior on `target.split`, or N demonstrations of `ript.few_shot_split`."""
    tc, rc = config.target, config.ript
    target = dataclasses.replace(tc, split=tc.split if demos == 0 else rc.few_shot_split)
    return dataclasses.replace(config, target=target, ript=dataclasses.replace(rc, sft_demos=demos))


def start_name(config: configs.Config) -> str:
    tc, rc = config.target, config.ript
    return f"prior-{tc.split}" if not rc.sft_demos else f"sft{rc.sft_demos}-{tc.split}"


def overview(lines: dict[str, dict]) -> str:
    """One line per start: its success at the start and at the end, the gain, groups kept, novel."""
    rows = [
        "| start | split | start (%) | final (%) | last 3 (%) | gain (points) | groups kept (%) | "
        "clip fraction | novel (%) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    keys = [
        ("start_success", "percent"),
        ("final_success_rate", "percent"),
        ("last3_success", "percent"),
        ("gain", "percent"),
        ("kept_share", "percent"),
        ("clip_fraction", "value"),
        ("novel_success", "percent"),
    ]
    for name, (split, summaries) in lines.items():
        cells = [reporting.figure([s.get(key) for s in summaries.values()], kind) for key, kind in keys]
        rows.append(f"| {name} | {split} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def main(argv: list[str]) -> int:
    config = configs.cli(argv, PROG, sections=SECTIONS, defaults=DEFAULTS)
    compile_cache.enable(config.compile_cache)
    config, prior = pretrain.load_target(config, PROG)
    root = pathlib.Path(config.out_dir) / f"ript-{config.target.task}"
    if config.ript.probe_stds:  # at the first start
        run_config = start_config(config, config.ript.starts[0]) if config.ript.starts else config
        rows = probe_stds(run_config, prior, config.ript.probe_stds)
        root.mkdir(parents=True, exist_ok=True)
        (root / f"probe_stds-{start_name(run_config)}.json").write_text(json.dumps(rows, indent=1))
        return 0
    starts = config.ript.starts or (config.ript.sft_demos,)
    lines = {}
    for demos in starts:
        run_config = start_config(config, demos) if config.ript.starts else config
        tc, rc = run_config.target, run_config.ript
        out = root / start_name(run_config) if config.ript.starts else root
        results, summaries = run_seeds(run_config, prior, out)
        settings = {"target": dataclasses.asdict(tc), "ript": dataclasses.asdict(rc)}
        reporting.write(
            out,
            "ript",
            "RIPT-VLA",
            settings,
            describe(run_config),
            ROWS if rc.sft_demos else ROWS[:-1],
            COLUMNS,
            results,
            summaries,
            f"RIPT on {tc.task}/{tc.split} from {start_name(run_config)}",
        )
        lines[start_name(run_config)] = (tc.split, summaries)
    if len(lines) > 1:
        text = "# RIPT-VLA from every start\n\n" + overview(lines)
        (root / "report.md").write_text(text)
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
