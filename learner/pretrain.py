"""The pretraining loop: behaviour cloning on demonstrations, checkpoints, logs and periodic MJX evals.

Python sees blocks of `log_every` steps (one jitted scan each); metrics come to the host once per block.
A run folder holds `checkpoints/`, `metrics.jsonl` (one JSON object per block or evaluation) and, at the
end, `training.png`. Starting a run whose folder has checkpoints resumes from the latest one.
"""

import dataclasses
import hashlib
import json
import pathlib
import time

import jax
from flax import nnx
from tqdm import tqdm

from configs import Config
from jaxvla import normalization
from jaxvla.models import ModelConfig
from learner import bc
from learner import dataset
from learner import evaluate
from learner import sharding
from learner.checkpoints import Checkpoints


@dataclasses.dataclass
class Prior:
    """What pretraining produced: enough to act, evaluate, export or fine-tune. Its `model` is what every
    later job builds on; `config_hash` names the whole pretraining config, which the prior does not carry."""

    model: ModelConfig
    config_hash: str
    graphdef: nnx.GraphDef
    params: nnx.State
    stats: dict
    step: int
    run_dir: pathlib.Path


def config_hash(fields: dict) -> str:
    """sha256 of a run's config as its checkpoint stores it, so a deployed file names what produced it."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def config_meta(config: Config, stats: dict) -> dict:
    """What a checkpoint must carry besides arrays to be usable on its own."""
    return {
        "config": dataclasses.asdict(config),
        "model": config.model.to_dict(),
        "stats": normalization.to_lists(stats),
    }


class MetricsLog:
    """Appends one JSON line per record; a resumed run continues the same file."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


class IterationLog:
    """An iterative method's progress: after each iteration, evaluate the params on the fixed test
    contexts (and their success on the validation contexts, which effort-to-goal reads) and log one
    record with the run's running totals (`env_steps`, `wall_s`, ...). Iteration 0 is the starting
    policy."""

    def __init__(self, kind: str, evaluator: evaluate.Evaluator, path: pathlib.Path):
        self.kind, self.evaluator = kind, evaluator
        self.contexts = evaluate.TEST.with_episodes(evaluator.episodes)
        self.validation = evaluate.VALIDATION.with_episodes(evaluator.episodes)
        self.log = MetricsLog(path)
        self.records: list[dict] = []
        self.report: dict = {}

    def __call__(
        self, params, iteration: int, totals: dict, extra: dict | None = None, *, changed: bool = True
    ) -> dict:
        """`changed` False: the params are those evaluated last, so their figures are reused."""
        if changed or not self.report:
            # The same compiled evaluator: the contexts are only its key.
            validation = self.evaluator.on(params, self.validation)
            self.report = {
                **self.evaluator.on(params, self.contexts),
                "validation_success": validation["success_rate"],
                "validation_ci": validation["success_ci"],
            }
        record = {"kind": self.kind, "iteration": iteration, **totals, **(extra or {}), **self.report}
        self.log.write(record)
        self.records.append(record)
        return record


def evaluators(config: Config, actor, episodes: int) -> dict[tuple[str, str], evaluate.Evaluator]:
    camera_res = config.model.image_res if config.model.image else None
    return {
        (task, split): evaluate.Evaluator(task, split, episodes, actor, camera_res=camera_res)
        for task in config.pretrain.tasks
        for split in ("train", "novel")
    }


def run_evals(evals: dict, params, key: jax.Array) -> dict[tuple[str, str], dict]:
    return {
        name: evaluate.summarize(ev(params, jax.random.fold_in(key, i)))
        for i, (name, ev) in enumerate(evals.items())
    }


def train(
    config: Config, episodes: list[dict], run_dir: pathlib.Path, *, mesh=None, progress: bool = True
) -> Prior:
    """Trains (or resumes) the prior on `episodes`; returns it after the last step."""
    pc, mc = config.pretrain, config.model
    mesh = mesh or sharding.make_mesh()
    data = dataset.flatten(episodes, mc.chunk)
    stats = normalization.compute(data["obs"])
    replicated = sharding.replicated(mesh)
    data = jax.device_put(data, replicated)

    graphdef, params = nnx.split(mc.create_policy(pc.seed), nnx.Param)
    opt = pc.optimizer
    optimizer = bc.make_optimizer(opt.learning_rate, pc.steps, opt.warmup_steps, opt.weight_decay)
    state = jax.device_put(bc.init_state(params, optimizer), replicated)
    checkpoints = Checkpoints(run_dir / "checkpoints", keep=pc.keep_checkpoints)
    if checkpoints.latest_step() is not None:
        state, meta = checkpoints.restore(state)
        stats = normalization.from_lists(meta["stats"])  # the run's own statistics, not today's data
        print(f"resumed {run_dir} at step {int(state.step)}")
    train_block = bc.make_train_steps(
        graphdef,
        stats,
        optimizer,
        num_steps=pc.log_every,
        batch_size=pc.batch_size,
        nll_weight=pc.nll_weight,
        mesh=mesh,
    )
    key_train, key_eval = jax.random.split(jax.random.key(pc.seed))
    evals = (
        evaluators(config, evaluate.chunk_actor(graphdef, stats), pc.eval_episodes) if pc.eval_every else {}
    )
    log = MetricsLog(run_dir / "metrics.jsonl")
    meta = config_meta(config, stats)

    start = int(state.step)
    bar = tqdm(total=pc.steps, initial=start, desc="pretrain", unit="step", disable=not progress)
    while int(state.step) < pc.steps:
        tic = time.perf_counter()
        state, metrics = train_block(state, data, key_train)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}  # the block's one host sync
        step = int(state.step)
        seconds = time.perf_counter() - tic
        # The first block's time includes compiling it.
        speed = pc.log_every / seconds
        log.write({"kind": "train", "step": step, "seconds": seconds, "steps_per_s": speed, **metrics})
        bar.update(pc.log_every)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", mse=f"{metrics['mse']:.4f}")
        if pc.eval_every and step % pc.eval_every == 0:
            report = run_evals(evals, state.params, jax.random.fold_in(key_eval, step))
            for (task, split), r in report.items():
                log.write({"kind": "eval", "step": step, "task": task, "split": split, **r})
            bar.write(
                f"step {step}: "
                + ", ".join(f"{t}/{s} {r['success_rate']:.0%}" for (t, s), r in report.items())
            )
        if step % pc.checkpoint_every == 0 or step >= pc.steps:
            checkpoints.save(step, state, meta)
    bar.close()
    checkpoints.close()
    return Prior(mc, config_hash(meta["config"]), graphdef, state.params, stats, int(state.step), run_dir)


def load(run_dir: pathlib.Path, step: int | None = None) -> Prior:
    """The prior saved in `run_dir` (latest step by default), without its optimiser state. Only the model
    is rebuilt from the stored config, so checkpoints written under older configs keep loading."""
    checkpoints = Checkpoints(pathlib.Path(run_dir) / "checkpoints")
    meta = checkpoints.restore_meta(step)
    model = ModelConfig.from_dict(meta["model"])
    graphdef, params = nnx.split(model.create_policy(0), nnx.Param)
    optimizer = bc.make_optimizer(1.0, 1, 0, 0.0)
    target = bc.init_state(params, optimizer)
    state, _ = checkpoints.restore(target, step)
    checkpoints.close()
    stats = normalization.from_lists(meta["stats"])
    return Prior(
        model,
        config_hash(meta["config"]),
        graphdef,
        state.params,
        stats,
        int(state.step),
        pathlib.Path(run_dir),
    )


def load_target(config: Config, prog: str) -> tuple[Config, Prior]:
    """The prior of `config.target` (`load_prior`), and `config` with the prior's model: a job that starts
    from a prior builds every network from the model the prior was trained with."""
    prior = load_prior(config.target.prior, prog)
    return dataclasses.replace(config, model=prior.model), prior


def load_prior(path: str, prog: str) -> Prior:
    """`load(path)` for a command named `prog`: where `path` holds no prior, exit saying how to make one."""
    try:
        return load(pathlib.Path(path))
    except FileNotFoundError:
        raise SystemExit(
            f"{prog}: no prior in {path}; train one with `jaxvla pretrain default` or point "
            "--target.prior at a run folder"
        ) from None


def plot(run_dir: pathlib.Path) -> pathlib.Path:
    """training.png: loss per step and evaluation success per task and split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    fig, (ax_loss, ax_eval) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot([r["step"] for r in train], [r["mse"] for r in train], label="chunk MSE")
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("step")
    ax_loss.set_title("behaviour cloning loss")
    ax_loss.legend()
    for task, split in sorted({(r["task"], r["split"]) for r in evals}):
        rows = [r for r in evals if (r["task"], r["split"]) == (task, split)]
        style = "-o" if split == "train" else "--s"
        ax_eval.plot(
            [r["step"] for r in rows], [r["success_rate"] for r in rows], style, label=f"{task}/{split}"
        )
    ax_eval.set_ylim(-0.02, 1.02)
    ax_eval.set_xlabel("step")
    ax_eval.set_title("MJX success rate")
    if evals:
        ax_eval.legend(fontsize=8)
    fig.tight_layout()
    path = run_dir / "training.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
