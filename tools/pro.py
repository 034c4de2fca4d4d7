"""`jaxvla pro <collect|train|eval|report> [config] [--pro.field value ...]`: the Process-Reward Operator.

- `collect`: log deployments of `target.prior` on `target.task` as RLDS episodes under `<data_dir>/pro/`: the
  prior on train and on novel (chunks sampled from it, so they vary), and on novel with the scripted
  operator taking over (patched and recovered episodes); the operator's demonstrations on both splits are
  made too if missing. These plus the demonstrations are the episode store PRO trains from.
- `train`: train PRO on every dataset in `pro.datasets` except the held-out episodes, loaded into the
  sharded replay with their labels (`pro.fill_replay`) and drawn from it shard by shard; checkpoints,
  `metrics.jsonl` and the numpy export (`pro.msgpack`) go to `<out_dir>/pro/`; rerun to resume.
- `eval`: held-out figures (value-order correlation, risk AUROC, calibration, drop lead time, termination
  accuracy, episode score), retry gating, ranking K chunks in MJX with and without PRO, and `episode.png`:
  value, risk and termination over one episode with its events marked. Writes `eval.json` and `eval.md`.
- `report`: the patching comparison, sparse operator reward against PRO reward, from the two
  `jaxvla patch` reports (`--patch.reward pro` writes the second): `compare.md` and `compare.png`.
- `trigger`: a state-only PRO (`--pro.net.no-action-input`) as the operator's trigger on the fixed test
  contexts of `target.split`: the scripted signs, the scripted signs plus ρ > `pro.risk_threshold`, and ρ
  alone; assisted success, operator steps, segments, false alarms, and ρ's lead time before the policy's
  first failure sign when it runs alone. Also retry gating and the episode score on the same episodes.
  Writes `trigger.json`.
- `rank`: the deterministic policy against ranking (its chunk and K - 1 samples, scored by an
  action-conditioned PRO, `--pro.conservative 5` for Cal-QL) on `train` and `target.split`, by component;
  writes `rank.json`.
"""

import dataclasses
import json
import math
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

import configs
import envs
from envs.cell import EVENTS
from envs.cell import FAILURE_MODES
from envs.rollout import rollout
from envs.tasks import get_task
from envs.wrappers import History
from envs.wrappers import Takeover
from envs.wrappers import Trigger
from jaxvla import episodes as rlds
from jaxvla import export
from jaxvla import normalization
from learner import bc
from learner import compile_cache
from learner import evaluate
from learner import patch
from learner import pretrain
from learner import pro
from learner import sharding
from learner.checkpoints import Checkpoints
from learner.pretrain import MetricsLog
from tools import eval as eval_tool
from tools import reporting

PROG = "jaxvla pro"
ACTIONS = ("collect", "train", "eval", "report", "trigger", "rank")
# What its actions read: `patch.sft_demos` (collect) and `patch.reward` (report) besides their own.
SECTIONS = ("target", "pro", "operator", "pretrain", "patch")
# The ranking and trigger evaluations' test contexts, fewer than the patching arms'.
DEFAULTS = {"target": {"eval_episodes": 128}}
NEVER = Trigger(slip=math.inf, force=math.inf, on_failure_event=False, stall_steps=2**30, disagreement=0.0)
PLOTTED_EVENTS = ("grasp", "slip", "drop", "retry", "missed_grasp", "collision")


def run_dir(config: configs.Config) -> pathlib.Path:
    return pathlib.Path(config.out_dir) / "pro"


# ------------------------------------------------------------------------------------------- collect
def deployment_batch(task: str, split: str, num_envs: int, trigger: Trigger, actor):
    """(params, key) -> rollout record [T, B] of the policy, the operator taking over on `trigger`."""
    env = Takeover(envs.make(task, split), trigger)
    reset, step = jax.vmap(env.reset), jax.vmap(env.step)

    def run(params, key):
        key_reset, key_act = jax.random.split(key)
        state = reset(jax.random.split(key_reset, num_envs))
        return rollout(step, lambda s, k: actor(params, s.obs, k), state, key_act, env.config.max_steps)[1]

    return jax.jit(run)


def collect(config: configs.Config) -> int:
    tc, pc, pre = config.target, config.pro, config.pretrain
    prior = pretrain.load_prior(tc.prior, PROG)
    patch.demonstrations(config, "train", pre.demos_per_task)
    if f"{tc.task}_novel" in pc.dataset_names(tc.task):
        patch.demonstrations(config, "novel", max(config.patch.sft_demos))
    sampled = evaluate.chunk_actor(prior.graphdef, prior.stats, explore=True)
    split = pc.collect_split
    kinds = {
        "prior_train": ("train", NEVER),
        f"prior_{split}": (split, NEVER),
        f"takeover_{split}": (split, config.operator),
    }
    batch = min(64, pc.collect_episodes)
    for i, (kind, (split, trigger)) in enumerate(kinds.items()):
        run = deployment_batch(tc.task, split, batch, trigger, sampled)
        episodes = []
        for j in tqdm(range(math.ceil(pc.collect_episodes / batch)), desc=f"collect {kind}", unit="batch"):
            key = jax.random.fold_in(jax.random.key(pc.seed), 1000 * i + j)
            episodes += pro.rollout_episodes(jax.device_get(run(prior.params, key)), tc.task, str(prior.step))
        episodes = episodes[: pc.collect_episodes]
        path = pathlib.Path(pre.data_dir) / "pro" / f"{tc.task}_{kind}"
        rlds.write_episodes(path, episodes, overwrite=True)
        success = np.mean([ep["episode_metadata"]["success"] for ep in episodes])
        helped = np.mean([ep["steps"]["is_intervention"].any() for ep in episodes])
        print(f"{path}: {len(episodes)} episodes, success {success:.0%}, operator took over in {helped:.0%}")
    return 0


# --------------------------------------------------------------------------------------------- train
def load_store(config: configs.Config) -> list[dict]:
    episodes = []
    for name in config.pro.dataset_names(config.target.task):
        path = pathlib.Path(config.pretrain.data_dir) / name
        if not path.exists():
            raise SystemExit(f"{PROG}: no dataset {path}; run `{PROG} collect {config.name}` first")
        episodes += rlds.read_episodes(path)
    return episodes


def train(config: configs.Config) -> int:
    pc = config.pro
    out = run_dir(config)
    train_eps, held = pro.split_heldout(load_store(config), pc.heldout)
    print(f"{len(train_eps)} training episodes, {len(held)} held out")
    stats = normalization.compute(
        {
            k: np.concatenate([ep["steps"]["observation"][k] for ep in train_eps])
            for k in train_eps[0]["steps"]["observation"]
        }
    )
    mesh = sharding.make_mesh()
    buffer = pro.fill_replay(train_eps, pc, mesh)
    graphdef, params = nnx.split(pc.net.create(pc.seed), nnx.Param)
    opt = pc.optimizer
    optimizer = bc.make_optimizer(opt.learning_rate, pc.steps, opt.warmup_steps, opt.weight_decay)
    state = jax.device_put(bc.init_state(params, optimizer), sharding.replicated(mesh))
    checkpoints = Checkpoints(out / "checkpoints", keep=2)
    if checkpoints.latest_step() is not None:
        state, _ = checkpoints.restore(state)
        print(f"resumed {out} at step {int(state.step)}")
    train_block = pro.make_train_steps(graphdef, stats, optimizer, pc, mesh)
    log = MetricsLog(out / "metrics.jsonl")
    meta = pro.checkpoint_meta(pc, stats)
    key = jax.random.key(pc.seed)
    bar = tqdm(total=pc.steps, initial=int(state.step), desc="PRO train", unit="step")
    tic = time.perf_counter()
    while int(state.step) < pc.steps:
        state, metrics = train_block(state, buffer, key)
        record = {
            "step": int(state.step),
            "wall_s": time.perf_counter() - tic,
            **{k: float(v) for k, v in jax.device_get(metrics).items()},
        }
        log.write(record)
        checkpoints.save(int(state.step), state, meta)
        bar.update(pc.log_every)
        bar.set_postfix(loss=f"{record['loss']:.3f}", risk=f"{record['risk']:.3f}")
    bar.close()
    checkpoints.close()
    path = export.write_pro(out / "pro.msgpack", pc.net, state.params, stats, version=int(state.step))
    print(f"wrote {out}/checkpoints and {path}")
    return 0


# ---------------------------------------------------------------------------------------------- eval
def ranked_arm(pc, policy, model) -> dict:
    """The `Evaluator` arguments of `policy` ranking K chunks by `model`: a state actor over a window. Its
    params are `pro.ranking_params(policy params, margin)`."""
    actor = pro.ranking_actor(
        policy.graphdef, policy.stats, model, samples=pc.rank_samples, risk_weight=pc.risk_weight
    )
    return {"state_actor": actor, "wrap": lambda env: History(env, model.net.window)}


def margin_label(margin: float) -> str:
    return "inf" if math.isinf(margin) else f"{margin:g}"


@dataclasses.dataclass
class CalibratedRanking:
    """Ranking by PRO on one split, the margin credited to the policy's own chunk chosen on the validation
    contexts among `pro.rank_margins` and infinity (the policy alone), a finite one only with a significant
    paired gain (`pro.choose_margin`): run `evaluator` on `params`."""

    evaluator: evaluate.Evaluator
    params: dict
    margin: float
    validation: dict[str, float]  # margin_label -> validation success
    sign_test: dict[str, float]  # margin_label -> p of its gain over the policy alone (finite margins)

    def summary(self) -> dict:
        return {
            "margin": margin_label(self.margin),
            "validation_by_margin": self.validation,
            "sign_test_p": self.sign_test,
        }


def calibrated_ranking(config: configs.Config, policy, model, split: str) -> CalibratedRanking:
    """`policy` ranked by `model` on `split`, its margin chosen on that split's validation contexts (as many
    as the test contexts, so both run one compiled program)."""
    tc, pc = config.target, config.pro
    evaluator = evaluate.Evaluator(tc.task, split, tc.eval_episodes, **ranked_arm(pc, policy, model))
    contexts = evaluate.VALIDATION.with_episodes(tc.eval_episodes)
    margins = (*pc.rank_margins, math.inf)
    outcomes = {
        m: evaluator(pro.ranking_params(policy.params, m), contexts.key)["success"].astype(bool)
        for m in margins
    }
    p = pro.sign_tests(outcomes)
    margin = pro.choose_margin(outcomes, p, pc.rank_significance)
    validation = {margin_label(m): float(np.mean(won)) for m, won in outcomes.items()}
    p = {margin_label(m): p_m for m, p_m in p.items()}
    return CalibratedRanking(evaluator, pro.ranking_params(policy.params, margin), margin, validation, p)


def ranking_evaluations(
    config: configs.Config, policy, split: str, seed: int = 0, *, pro_dir: str | None = None
) -> dict:
    """Success of `policy` (a Prior-like: graphdef, params, stats) on `split`: its deterministic chunk,
    one sampled chunk, and the best of its deterministic and K - 1 sampled chunks by the PRO in `pro_dir`
    (default: this run's) when that PRO is action-conditioned (a state-only one cannot rank)."""
    tc, pc = config.target, config.pro
    model = pro.load(pro_dir or run_dir(config))
    key = jax.random.key(seed)
    actors = {
        "mode": {"actor": evaluate.chunk_actor(policy.graphdef, policy.stats)},
        "sampled": {"actor": evaluate.chunk_actor(policy.graphdef, policy.stats, explore=True)},
    }
    out = {}
    for name, kwargs in actors.items():
        evaluator = evaluate.Evaluator(tc.task, split, tc.eval_episodes, **kwargs)
        out[name] = evaluate.summarize(evaluator(policy.params, key))
    if model.net.action_input:
        ranked = calibrated_ranking(config, policy, model, split)
        summary = evaluate.summarize(ranked.evaluator(ranked.params, key))
        out[f"ranked_k{pc.rank_samples}"] = {**summary, **ranked.summary()}
    return out


def plot_episode(episode: dict, readouts: dict, path: pathlib.Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = np.arange(len(readouts["value"]))
    events = np.asarray(episode["steps"]["events"])
    fig, axes = plt.subplots(4, 1, figsize=(10, 9), sharex=True)
    axes[0].plot(t, readouts["value"], color="C0")
    axes[0].set_ylabel("progress value V")
    risk = readouts["risk"]
    axes[1].stackplot(t, *[risk[:, k] for k in range(1, risk.shape[1])], labels=FAILURE_MODES[1:], alpha=0.8)
    axes[1].set_ylabel("risk ρ by mode")
    axes[1].legend(loc="upper left", fontsize=7, ncol=3)
    axes[2].plot(t, readouts["done"], label="d: P(done)")
    axes[2].plot(t, readouts["success"], label="q: P(success)")
    axes[2].set_ylabel("termination")
    axes[2].legend(loc="upper left", fontsize=8)
    telemetry = episode["steps"]["observation"]["telemetry"]
    for i, name in enumerate(("vacuum / p_max", "force / 50 N", "slip ratio")):
        axes[3].plot(t, telemetry[:, i], label=name)
    axes[3].set_ylabel("telemetry")
    axes[3].legend(loc="upper left", fontsize=8)
    axes[3].set_xlabel("control step (10 Hz)")
    intervention = np.asarray(episode["steps"]["is_intervention"])
    for ax in axes:
        for k, name in enumerate(PLOTTED_EVENTS):
            for s in np.flatnonzero(events[:, EVENTS.index(name)]):
                ax.axvline(s, color=f"C{k + 3}", lw=1, ls="--", label=name if ax is axes[0] else None)
        operator = "operator" if ax is axes[0] and intervention.any() else None
        ax.fill_between(
            t,
            0,
            1,
            where=intervention,
            transform=ax.get_xaxis_transform(),
            color="grey",
            alpha=0.15,
            label=operator,
        )
    axes[0].legend(loc="lower right", fontsize=7, ncol=4)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def example_episode(episodes: list[dict]) -> int:
    """A held-out episode worth plotting: one where the operator took over part of the way (the plot marks
    the takeover against PRO's risk; a demonstration is the operator's throughout), else one with a drop,
    else a slip, else a failure, else the first."""
    for i, ep in enumerate(episodes):
        operator = np.asarray(ep["steps"]["is_intervention"])
        if operator.any() and not operator.all():
            return i
    for wanted in ("drop", "slip"):
        for i, ep in enumerate(episodes):
            if np.asarray(ep["steps"]["events"])[:, EVENTS.index(wanted)].any():
                return i
    return next((i for i, ep in enumerate(episodes) if not ep["episode_metadata"]["success"]), 0)


def gating_summary(episodes: list[dict], readouts: list[dict], pc: configs.ProConfig, task: str) -> dict:
    hz = get_task(task).default_config.control_hz
    gated = pro.gated_outcomes(episodes, readouts, pc.gate_success, hz)
    success = np.array([ep["episode_metadata"]["success"] for ep in episodes], bool)
    cycle = np.array([ep["episode_metadata"]["cycle_time"] for ep in episodes])
    per_hour = lambda s, c: float(np.sum(s) / (np.sum(c) / 3600.0))  # noqa: E731
    return {
        "episodes": len(episodes),
        "stopped": int(gated["stopped"].sum()),
        "stopped_that_would_succeed": int((gated["stopped"] & success).sum()),
        "success_without_gate": float(success.mean()),
        "success_with_gate": float(gated["success"].mean()),
        "hours_without_gate": float(cycle.sum() / 3600.0),
        "hours_with_gate": float(gated["cycle_time"].sum() / 3600.0),
        "throughput_without_gate": per_hour(success, cycle),
        "throughput_with_gate": per_hour(gated["success"], gated["cycle_time"]),
    }


def eval_markdown(result: dict) -> str:
    h, g = result["heldout"], result["gating"]
    voc = h["value_order_correlation"]
    lines = [
        f"# PRO on held-out episodes ({h['episodes']} episodes, {h['steps']} steps)",
        "",
        "| measure | value |",
        "|---|---:|",
        f"| value-order correlation (Spearman V vs t, successes) | {voc['mean']:.3f} mean, "
        f"{voc['median']:.3f} median |",
        f"| risk AUROC, failure within Δ | {h['risk_auroc']:.3f} |",
        f"| risk calibration error (ECE) | {h['risk_calibration_error']:.3f} |",
        f"| drop lead time [steps] | median {h['drop_lead_steps']['median']}, mean "
        f"{h['drop_lead_steps']['mean']} over {h['drops']} drops; warned >= 2 steps ahead: "
        f"{h['drop_lead_steps']['warned']} |",
        f"| termination accuracy (balanced) | {h['termination_accuracy']:.3f} "
        f"({h['termination_balanced_accuracy']:.3f}) |",
        f"| outcome accuracy at the last step | {h['outcome_accuracy_at_end']:.3f} |",
        f"| episode score vs implicit return, Spearman | {h['quality_vs_implicit_return_spearman']:.3f} |",
        f"| episode score AUROC for success | {h['quality_success_auroc']:.3f} |",
        "",
        f"Retry gating (stop at a retry when q < gate): stopped {g['stopped']} of {g['episodes']} "
        f"({g['stopped_that_would_succeed']} would have succeeded); success "
        f"{g['success_without_gate']:.1%} -> {g['success_with_gate']:.1%}; "
        f"throughput {g['throughput_without_gate']:.0f} -> "
        f"{g['throughput_with_gate']:.0f} successes/h.",
    ]
    if result.get("ranking"):
        lines += [
            "",
            "| ranking (MJX) | split | success | retries/ep | recovery | succ/h |",
            "|---|---|---:|---:|---:|---:|",
        ]
    for split, rows in result.get("ranking", {}).items():
        for name, r in rows.items():
            recovery = f"{r['recovery_rate']:.0%}" if r["recovery_rate"] is not None else "-"
            lines.append(
                f"| {name} | {split} | {r['success_rate']:.1%} | {r['retries_per_episode']:.2f} | "
                f"{recovery} | {r['throughput_per_hour']:.0f} |"
            )
    return "\n".join(lines) + "\n"


def heldout_evaluation(
    model: pro.Pro, held: list[dict], pc: configs.ProConfig, task: str, plot_path: pathlib.Path
) -> dict:
    """PRO's figures on held-out episodes and the retry gate's effect on them; plots an example episode."""
    readouts = pro.score_episodes(model, held)
    result = {
        "heldout": pro.evaluation(held, readouts, pc),
        "gating": gating_summary(held, readouts, pc, task),
    }
    i = example_episode(held)
    meta = held[i]["episode_metadata"]
    plot_episode(
        held[i],
        readouts[i],
        plot_path,
        f"PRO over a held-out episode: {meta['task']}, success {meta['success']}, "
        f"retries {meta['retries']}, source {meta['source']}",
    )
    return result


def evaluate_pro(config: configs.Config) -> int:
    tc, pc = config.target, config.pro
    out = run_dir(config)
    _, held = pro.split_heldout(load_store(config), pc.heldout)
    result = heldout_evaluation(pro.load(out), held, pc, tc.task, out / "episode.png")
    prior = pretrain.load_prior(tc.prior, PROG)
    # On novel the prior fails every episode; the patched policies are ranked there by `jaxvla patch`.
    result["ranking"] = {"train": ranking_evaluations(config, prior, "train")}
    (out / "eval.json").write_text(json.dumps(result, indent=1))
    report = eval_markdown(result)
    (out / "eval.md").write_text(report)
    print(report)
    print(f"wrote {out / 'eval.md'}, {out / 'eval.json'}, {out / 'episode.png'}")
    return 0


# ------------------------------------------------------------------------------------------- trigger
FAILURE_SIGNS = [EVENTS.index(name) for name in ("slip", "drop", "missed_grasp", "collision")]


def risk_protocol(task: str, split: str, num_envs: int, trigger: Trigger, actor, model: pro.Pro):
    """(params, key, threshold) -> a `patch.Collector`-like output: the policy with the operator ready to
    take over on `trigger` or on ρ > threshold, and the same contexts without the operator ("solo_*",
    with ρ recorded: an alarm-free RiskTakeover). Compiled once per trigger; the threshold is traced."""
    base = envs.make(task, split)
    length = base.config.max_steps

    def run(params, key, threshold):
        policy = lambda s, k: actor(params, s.obs, k)  # noqa: E731
        key_reset, key_act = jax.random.split(key)
        keys = jax.random.split(key_reset, num_envs)
        assisted = History(pro.RiskTakeover(base, trigger, model, threshold), model.net.window)
        alone = History(pro.RiskTakeover(base, NEVER, model, jnp.float32(2.0)), model.net.window)
        run_env = lambda env: rollout(jax.vmap(env.step), policy, jax.vmap(env.reset)(keys), key_act, length)  # noqa: E731
        last, record = run_env(assisted)
        solo_last, solo = run_env(alone)
        return {
            "block": patch.episode_block(record, 0),
            "success": last.info["success"],
            "component": last.params.component,
            "solo_success": solo_last.info["success"],
            "solo": {
                "rho": solo["info"]["rho"],
                "events": solo["info"]["events"],
                "slip": solo["info"]["slip"],
                "force": solo["info"]["contact_force"],
                "ended": solo["done"] | solo["truncated"],
            },
        }

    return jax.jit(run)


def first_step(flags: np.ndarray) -> np.ndarray:
    """[T, B] bool -> [B]: the first step a flag is on, or T where it never is."""
    return np.where(flags.any(axis=0), flags.argmax(axis=0), len(flags))


def alarm_leads(solo: dict, success: np.ndarray, threshold: float, trigger: Trigger) -> dict:
    """Lead time of ρ > threshold and of the scripted warnings (load, force, failure events) before the
    policy's first failure sign (a slip, drop, missed grasp or collision event, or a failed end), on the
    episodes the policy ran alone: [T, B] leaves. A late or missing alarm leads by 0."""
    events = np.asarray(solo["events"], bool)
    ended = np.cumsum(solo["ended"], axis=0) - solo["ended"] > 0  # steps after the episode's end
    sign = events[..., FAILURE_SIGNS].any(axis=-1) | (solo["ended"] & ~success[None])
    sign_at = first_step(sign & ~ended)
    risky = (np.asarray(solo["rho"]) > threshold) & ~ended
    scripted = (solo["slip"] > trigger.slip) | (solo["force"] > trigger.force)
    scripted = (scripted | events[..., [EVENTS.index("slip"), EVENTS.index("missed_grasp")]].any(-1)) & ~ended
    failing = sign_at < len(sign)

    def leads(alarm):
        at = first_step(alarm)
        lead = np.where(at <= sign_at, sign_at - at, 0)[failing]
        return {
            "median_steps": float(np.median(lead)) if lead.size else None,
            "warned_share": float(np.mean(lead >= 1)) if lead.size else None,
            "false_alarm_share": float(np.mean(alarm.any(axis=0)[~failing])) if (~failing).any() else None,
        }

    return {
        "episodes_with_a_failure_sign": int(failing.sum()),
        "risk": leads(risky),
        "scripted": leads(scripted),
    }


def trigger(config: configs.Config) -> int:
    """Risk-triggered takeovers against the scripted triggers, retry gating and the episode score."""
    tc, pc = config.target, config.pro
    split = tc.split
    out = run_dir(config)
    model = pro.load(out)
    prior = pretrain.load_prior(tc.prior, PROG)
    actor = evaluate.chunk_actor(prior.graphdef, prior.stats)
    contexts = evaluate.TEST.with_episodes(tc.eval_episodes)
    components = get_task(tc.task).split(split).component_names
    scripted = dataclasses.replace(config.operator, lookahead=0)
    arms = {
        "scripted": (scripted, 2.0),
        "scripted+risk": (scripted, pc.risk_threshold),
        "risk": (NEVER, pc.risk_threshold),
    }
    runs, rows, result = {}, {}, {"threshold": pc.risk_threshold, "split": split, "arms": {}}
    for name, (trig, threshold) in arms.items():
        if trig not in runs:  # one compiled program per trigger; the threshold is an argument
            runs[trig] = risk_protocol(tc.task, split, tc.eval_episodes, trig, actor, model)
        run = runs[trig]
        rolled = jax.device_get(run(prior.params, contexts.key, jnp.float32(threshold)))
        rows[name, split] = patch.protocol_report(rolled, components)
        result["arms"][name] = rows[name, split]
        print(f"{name}: {rows[name, split]['assisted_success']:.1%}", flush=True)
    solo = {k: np.asarray(v) for k, v in rolled["solo"].items()}
    result["lead"] = alarm_leads(solo, np.asarray(rolled["solo_success"], bool), pc.risk_threshold, scripted)
    result["deployment"] = deployment_scores(config, prior, model, split)
    (out / "trigger.json").write_text(json.dumps(result, indent=1))
    print(eval_tool.format_protocol(rows))
    print(json.dumps({"lead": result["lead"], "deployment": result["deployment"]}, indent=1))
    print(f"wrote {out / 'trigger.json'}")
    return 0


def deployment_scores(config: configs.Config, prior, model: pro.Pro, split: str) -> dict:
    """On the prior's own deployments of `split` (sampled chunks, no operator): retry gating, and the
    episode score (mean V - λρ) as a fleet-gate signal: its AUROC for the episode's success."""
    tc, pc = config.target, config.pro
    sampled = evaluate.chunk_actor(prior.graphdef, prior.stats, explore=True)
    run = deployment_batch(tc.task, split, tc.eval_episodes, NEVER, sampled)
    record = jax.device_get(run(prior.params, jax.random.fold_in(evaluate.VALIDATION.key, 7)))
    episodes = pro.rollout_episodes(record, tc.task, str(prior.step))
    readouts = pro.score_episodes(model, episodes, length=get_task(tc.task).default_config.max_steps)
    success = np.array([ep["episode_metadata"]["success"] for ep in episodes], bool)
    scores = np.array([pro.quality(r, pc.risk_weight) for r in readouts])
    return {
        "gating": gating_summary(episodes, readouts, pc, tc.task),
        "episode_score_success_auroc": pro.auroc(scores, success),
        "episode_score_mean_success": float(scores[success].mean()) if success.any() else None,
        "episode_score_mean_failure": float(scores[~success].mean()) if (~success).any() else None,
    }


# ---------------------------------------------------------------------------------------------- rank
def rank(config: configs.Config) -> int:
    """The deterministic policy against ranking, on the fixed test contexts of train and `target.split`;
    ranking's margin is chosen on each split's validation contexts."""
    tc, pc = config.target, config.pro
    out = run_dir(config)
    model = pro.load(out)
    prior = pretrain.load_prior(tc.prior, PROG)
    contexts = evaluate.TEST.with_episodes(tc.eval_episodes)
    deterministic = evaluate.chunk_actor(prior.graphdef, prior.stats)
    ranked = f"ranked_k{pc.rank_samples}"
    report, margins = {}, {}
    for split in dict.fromkeys(("train", config.target.split)):
        evaluator = evaluate.Evaluator(tc.task, split, tc.eval_episodes, deterministic)
        report["deterministic", split] = evaluator.on(prior.params, contexts)
        calibrated = calibrated_ranking(config, prior, model, split)
        report[ranked, split] = calibrated.evaluator.on(calibrated.params, contexts)
        margins[split] = calibrated.summary()
        for name in ("deterministic", ranked):
            print(f"{name}/{split}: {report[name, split]['success_rate']:.1%}", flush=True)
        print(f"margin on {split}, chosen on validation: {margins[split]}", flush=True)
    print(evaluate.format_table(report))
    rows = [{"arm": a, "split": s, **r} for (a, s), r in report.items()]
    payload = {"conservative": pc.conservative, "margins": margins, "rows": rows}
    (out / "rank.json").write_text(json.dumps(payload, indent=1))
    print(f"wrote {out / 'rank.json'}")
    return 0


# -------------------------------------------------------------------------------------------- report
def arm_summary(records: list[dict], level: float) -> dict:
    """One seed of one arm: effort to reach `level` and the final figures."""
    hit, final = reporting.first_reaching(records, level), records[-1]
    return {
        "env_steps_to_level": hit["env_steps"] if hit else None,
        "wall_s_to_level": hit["wall_s"] if hit else None,
        "corrective_episodes_to_level": hit["corrective_episodes"] if hit else None,
        "takeover_steps_to_level": hit["takeover_steps"] if hit else None,
        "best_success": max(r["success_rate"] for r in records[1:]),
        "final_success": final["success_rate"],
        "final_recovery": final["recovery_rate"],
        "final_retries": final["retries_per_episode"],
        "final_corrective_episodes": final["corrective_episodes"],
        "final_takeover_steps": final["takeover_steps"],
    }


def compare(sparse: dict, dense: dict, levels: tuple[float, ...]) -> dict:
    out = {}
    for level in levels:
        arms = {}
        for name, report in (("sparse", sparse), ("pro", dense)):
            arms[name] = {seed: arm_summary(r["patch"], level) for seed, r in report["seeds"].items()}
        out[f"{level:.2f}"] = arms
    return out


def report(config: configs.Config) -> int:
    tc, base = config.target, pathlib.Path(config.out_dir)
    paths = {
        "sparse": base / f"patch-{tc.task}-{tc.split}" / "report.json",
        "pro": base / f"patch-{tc.task}-{tc.split}-pro" / "report.json",
    }
    for name, path in paths.items():
        if not path.exists():
            flag = " --patch.reward pro" if name == "pro" else ""
            raise SystemExit(f"{PROG}: no {path}; run `jaxvla patch {config.name}{flag}` first")
    sparse, dense = (json.loads(p.read_text()) for p in paths.values())
    # The same budget for both arms: the rounds both ran.
    rounds = min(len(r["patch"]) for report_ in (sparse, dense) for r in report_["seeds"].values())
    for report_ in (sparse, dense):
        for r in report_["seeds"].values():
            r["patch"] = r["patch"][:rounds]
    result = compare(sparse, dense, (0.95, 0.80, 0.30))
    ranking = {seed: r.get("ranking") for seed, r in dense["seeds"].items()}
    text = compare_markdown(result, ranking, rounds - 1)
    out = run_dir(config)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps({"levels": result, "ranking": ranking}, indent=1))
    (out / "compare.md").write_text(text)
    compare_plot(sparse, dense, out / "compare.png")
    print(text)
    print(f"wrote {out / 'compare.md'}, {out / 'compare.png'}")
    return 0


def compare_markdown(result: dict, ranking: dict, rounds: int) -> str:
    measures = (
        ("env_steps_to_level", "env steps to reach it"),
        ("wall_s_to_level", "wall-clock to reach it [s]"),
        ("corrective_episodes_to_level", "corrective episodes to reach it"),
        ("takeover_steps_to_level", "operator takeover steps to reach it"),
    )
    finals = (
        ("best_success", "best success"),
        ("final_success", "final success"),
        ("final_recovery", "recovery after a first failure (final)"),
        ("final_retries", "retries per episode (final)"),
        ("final_corrective_episodes", "operator interventions: corrective episodes (all rounds)"),
        ("final_takeover_steps", "operator takeover steps (all rounds)"),
    )
    lines = [
        "# Patching with the sparse operator reward vs the PRO reward",
        "",
        f"Both arms over their first {rounds} rounds (same episodes per round and updates).",
        "",
    ]
    for level, arms in result.items():
        reached = {n: sum(v["env_steps_to_level"] is not None for v in a.values()) for n, a in arms.items()}
        lines += [
            f"## success >= {float(level):.0%} (seeds reaching it: sparse {reached['sparse']}, "
            f"PRO {reached['pro']})",
            "",
            "| measure | sparse | PRO |",
            "|---|---:|---:|",
        ]
        for key, name in measures:
            row = [reporting.over_seeds([s[key] for s in arms[a].values()]) for a in ("sparse", "pro")]
            lines.append(f"| {name} | {row[0]} | {row[1]} |")
        lines.append("")
    arms = next(iter(result.values()))
    lines += ["## Final figures", "", "| measure | sparse | PRO |", "|---|---:|---:|"]
    for key, name in finals:
        row = [reporting.over_seeds([s[key] for s in arms[a].values()]) for a in ("sparse", "pro")]
        lines.append(f"| {name} | {row[0]} | {row[1]} |")
    if any(ranking.values()):
        lines += [
            "",
            "## Ranking K chunks with PRO (final PRO-patched policies)",
            "",
            "| seed | mode | one sample | best of K |",
            "|---|---:|---:|---:|",
        ]
        for seed, rows in ranking.items():
            if rows:
                cells = [f"{r['success_rate']:.1%}" for r in rows.values()]
                lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def compare_plot(sparse: dict, dense: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for color, (name, report_) in zip(
        ("C0", "C2"), (("sparse reward", sparse), ("PRO reward", dense)), strict=True
    ):
        for i, result in enumerate(report_["seeds"].values()):
            records = result["patch"]
            for ax, key in zip(axes, ("env_steps", "wall_s", "takeover_steps"), strict=True):
                reporting.plot_success(ax, records, key, color=color, label=name if i == 0 else None)
    for ax, label in zip(
        axes, ("environment steps", "wall-clock [s]", "operator takeover steps"), strict=True
    ):
        ax.set_xlabel(label)
        ax.set_ylim(-0.02, 1.02)
        ax.axhline(0.95, color="grey", lw=0.8, ls=":")
    axes[0].set_ylabel("success on novel (no operator)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ACTIONS:
        print(f"usage: {PROG} <{'|'.join(ACTIONS)}> [config] [--pro.field value ...]", file=sys.stderr)
        return 2
    action, rest = argv[0], argv[1:]
    config = configs.cli(rest, f"{PROG} {action}", sections=SECTIONS, defaults=DEFAULTS)
    compile_cache.enable(config.compile_cache)
    actions = {
        "collect": collect,
        "train": train,
        "eval": evaluate_pro,
        "report": report,
        "trigger": trigger,
        "rank": rank,
    }
    return actions[action](config)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
