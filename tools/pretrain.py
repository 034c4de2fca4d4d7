"""`jaxvla pretrain [config] [--section.field value ...]`: the foundation prior, by behaviour cloning.

Reads `train`-split demonstrations of every task in `pretrain.tasks` from `pretrain.data_dir` (generating
any that are missing with the scripted operator), trains one goal-conditioned policy, evaluates it in MJX
on both splits, and leaves in `out_dir/<config name>/`: checkpoints, metrics.jsonl, training.png and
report.json. Rerunning the same command resumes from the latest checkpoint.
"""

import json
import pathlib

import jax

import configs
from learner import compile_cache
from learner import evaluate
from learner import pretrain

PROG = "jaxvla pretrain"


def demonstrations(config: configs.Config) -> list[dict]:
    """Every task's `train` demonstrations, read from disk, generated first where too few exist."""
    from envs import demos as operator_demos

    pc = config.pretrain
    out = []
    for task in pc.tasks:
        out.extend(
            operator_demos.load_or_generate(
                pc.data_dir,
                task,
                "train",
                pc.demos_per_task,
                seed=pc.seed,
                noise=pc.demo_noise,
                bursts=pc.demo_bursts,
            )
        )
    return out


def main(argv: list[str]) -> int:
    config = configs.cli(argv, PROG, sections=("model", "pretrain"))
    compile_cache.enable(config.compile_cache)
    run_dir = pathlib.Path(config.out_dir) / config.name
    prior = pretrain.train(config, demonstrations(config), run_dir)
    print(f"trained {prior.step} steps; plot: {pretrain.plot(run_dir)}")
    evals = pretrain.evaluators(
        config, evaluate.chunk_actor(prior.graphdef, prior.stats), config.pretrain.eval_episodes
    )
    report = pretrain.run_evals(evals, prior.params, jax.random.key(config.pretrain.seed + 1))
    print(evaluate.format_table(report))
    rows = [{"task": t, "split": s, **r} for (t, s), r in report.items()]
    (run_dir / "report.json").write_text(json.dumps({"step": prior.step, "evaluation": rows}, indent=2))
    return 0
