"""`jaxvla ript [config] [--ript.field value ...]`: RIPT-VLA on the split the prior fails on.

Loads the prior from `ript.prior` (optionally retrains it on `ript.sft_demos` operator demonstrations of
the split first, the paper's few-shot SFT stage), then for every seed in `ript.seeds` runs
`learner.ript.run_ript`. Writes to `out_dir/ript-<task>/`: `report.json` (every iteration of every
seed), `report.md` (mean ± std over seeds next to the prior and policy patching), `ript.png` and one
`seed<N>/metrics.jsonl` per seed.
"""

import dataclasses
import pathlib
import sys
import time

import jax

import configs
from learner import evaluate
from learner import patch
from learner import ript
from tools import data
from tools import practice
from tools.patch import load_prior

PROG = "jaxvla ript"


ROWS = [
    ("rollouts", "rollouts", "count"),
    ("informative groups kept (of rollouts / K)", "kept_groups", "value"),
    ("iterations with an update", "updates", "value"),
    ("successful sampled rollouts", "successful_rollouts", "value"),
    ("success on `train` afterwards (%)", "train_success", "percent"),
    ("SFT stage wall-clock (s)", "sft_wall_s", "value"),
]


def successful_rollouts(records: list[dict], per_iteration: int) -> int:
    return round(sum(r["rollout_success"] * per_iteration for r in records[1:]))


def describe(config: configs.Config) -> str:
    """The run's settings in one paragraph, for the report."""
    rc = config.ript
    start = "the prior" if not rc.sft_demos else f"the prior after BC on {rc.sft_demos} demonstrations"
    return (
        f"RIPT on {rc.task}/{rc.split} from {start}, seeds {list(rc.seeds)}: {rc.iterations} iterations of "
        f"{rc.rollouts_per_iteration} rollouts ({rc.contexts} contexts, K = {rc.group_size} per context, "
        f"{rc.groups_per_call} contexts per call), {rc.epochs} PPO epochs of {rc.minibatches} steps (clip "
        f"{rc.clip_low}/{rc.clip_high}, lr {rc.learning_rate}), std x{rc.temperature} while sampling, "
        f"{rc.execute} action(s) of each chunk executed; {rc.eval_episodes} evaluation episodes (mean "
        "chunk, receding horizon) per iteration."
    )


def run_seeds(
    config: configs.Config, prior, out: pathlib.Path, *, train_eval: bool = True
) -> tuple[dict, dict]:
    """RIPT from `prior` (after its few-shot SFT stage, if any) once per seed in `ript.seeds`: every
    seed's records and its summary (with the final policy's success on `train` when `train_eval`)."""
    rc, pre = config.ript, config.pretrain
    if not 1 <= rc.execute <= prior.config.model.chunk:
        raise SystemExit(f"{PROG}: ript.execute={rc.execute} must lie in 1..{prior.config.model.chunk}, "
                         "the prior's chunk length")  # fmt: skip
    demos, offline = [], []
    if rc.sft_demos:
        offline = data.load_or_generate(pre.data_dir, rc.task, "train", config.patch.offline_episodes,
                                        seed=pre.seed)  # fmt: skip
        demos = data.load_or_generate(pre.data_dir, rc.task, rc.split, rc.sft_demos, seed=pre.seed + 1,
                                      noise=pre.demo_noise, bursts=pre.demo_bursts)  # fmt: skip
    collector = ript.GroupCollector(rc.task, rc.split, rc.groups_per_call, rc.group_size, prior.graphdef,
                                    prior.stats, execute=rc.execute, temperature=rc.temperature)  # fmt: skip
    actor = evaluate.chunk_actor(prior.graphdef, prior.stats)
    evaluator = evaluate.Evaluator(rc.task, rc.split, rc.eval_episodes, actor)
    on_train = evaluate.Evaluator(rc.task, "train", rc.eval_episodes, actor) if train_eval else None
    results, summaries = {}, {}
    for seed in rc.seeds:
        tic = time.perf_counter()
        start = prior.params
        if rc.sft_demos:
            start = jax.block_until_ready(patch.sft_retrain(config, prior, demos + offline, seed=seed))
        sft_s = time.perf_counter() - tic
        key_contexts = jax.random.fold_in(jax.random.key(seed), 1_000_003)
        contexts = jax.vmap(collector.env.sample_params)(jax.random.split(key_contexts, rc.contexts))
        records, params = ript.run_ript(config, prior, start, seed=seed, collector=collector,
                                        evaluator=evaluator, contexts=contexts,
                                        run_dir=out / f"seed{seed}")  # fmt: skip
        results[seed] = records
        summaries[seed] = {
            **practice.seed_summary(records, ("rollouts", "kept_groups", "updates")),
            "sft_wall_s": sft_s,
            "sft_demo_steps": int(sum(len(ep["steps"]["action"]) for ep in demos)),
            "successful_rollouts": successful_rollouts(records, rc.rollouts_per_iteration),
            "train_success": evaluate.summarize(on_train(params, jax.random.key(seed)))["success_rate"]
            if train_eval
            else None,
        }
        print({"seed": seed, **summaries[seed]}, flush=True)
    return results, summaries


def main(argv: list[str]) -> int:
    config = configs.cli(argv, prog=PROG)
    jax.config.update("jax_compilation_cache_dir", config.compile_cache)
    rc = config.ript
    out = pathlib.Path(config.out_dir) / f"ript-{rc.task}"
    results, summaries = run_seeds(config, load_prior(rc.prior), out)
    practice.write(
        out,
        "ript",
        "RIPT-VLA",
        {"ript": dataclasses.asdict(rc)},
        describe(config),
        ROWS if rc.sft_demos else ROWS[:-1],
        results,
        summaries,
        f"RIPT on {rc.task}/{rc.split}",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
