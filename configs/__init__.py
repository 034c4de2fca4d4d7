"""Experiment configs: frozen dataclasses, a registry of named configs, and the tyro CLI over them.

A run starts from a named config (`get_config("debug")`, or `jaxvla <command> debug` on the command line)
and overrides fields by path (`--target.task sort`). To add a config, append it to `_CONFIGS`; to add a
section (model, learner, ...), add a frozen dataclass and a field on `Config`. Field docstrings are the
CLI help. Modelled on openpi `training/config.py`.

Every job reads `target` (the prior, task, split, seeds and test contexts it works on) and its own
sections; `cli(argv, prog, sections=...)` parses and documents only those, so a command's `--help` lists
what it reads and a flag it would ignore is an error.
"""

import dataclasses
import difflib
import typing
from collections.abc import Iterable
from collections.abc import Sequence
from typing import Literal

import tyro

from envs.operator import Trigger
from jaxvla.models import ModelConfig
from jaxvla.models.pro import ProNetConfig
from jaxvla.schema import SPLITS

# Literal of a tuple is the Literal of its items: tyro offers the splits as choices.
Split = Literal[SPLITS]
# Where compiled programs are kept between runs (`learner.compile_cache`), relative to the working folder.
COMPILE_CACHE = ".cache/jax"


@dataclasses.dataclass(frozen=True)
class TargetConfig:
    """What a job works on: the prior it starts from, the task and split, its seeds and its test contexts.
    One section for every command, so `--target.task sort` moves patching, Recap, RIPT, PRO and the fleet
    together."""

    prior: str = "runs/default"
    """Run folder of the pretrained prior (`jaxvla pretrain`); the model comes from it."""
    task: str = "pick_place"
    """Registered task name in `envs/`."""
    split: Split = "deploy"
    """Item distribution: "train" (the pretraining one), "deploy" (mostly train, plus tails the prior fails
    on; where every method is compared), "tail" (those tails alone) or "novel" (the stress split: heavier,
    porous, displaced, new)."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """One run of every arm per seed."""
    eval_episodes: int = 256
    """Fixed test contexts every round, iteration and arm is scored on (no operator); headline figures."""

    def __post_init__(self) -> None:
        # Literal is only checked by tyro; configs built in Python are checked here.
        if self.split not in SPLITS:
            raise ValueError(f"TargetConfig.split must be one of {SPLITS}, got {self.split!r}")
        if not self.seeds or self.eval_episodes < 1:
            raise ValueError("TargetConfig needs at least one seed and one evaluation episode")


@dataclasses.dataclass(frozen=True)
class AdamW:
    """AdamW with a linear warm-up and a cosine decay (`learner.bc.make_optimizer`)."""

    learning_rate: float = 3e-4
    """Peak learning rate."""
    warmup_steps: int = 500
    """Linear warm-up length."""
    weight_decay: float = 1e-4
    """Decoupled weight decay."""


@dataclasses.dataclass(frozen=True)
class EnvConfig:
    """The simulated workcell (`target.task` on `target.split`): how many copies at once, with a camera."""

    num_envs: int = 64
    """Environments stepped in parallel (the vmapped batch size)."""
    camera: bool = False
    """Add ray-cast camera images to the observations (slower)."""
    seed: int = 0
    """Seed of the root PRNG key that resets the environments."""

    def __post_init__(self) -> None:
        if self.num_envs < 1:
            raise ValueError(f"EnvConfig.num_envs must be at least 1, got {self.num_envs}")


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """Behaviour cloning of the scripted operator: the foundation prior every later method improves."""

    tasks: tuple[str, ...] = ("pick_place", "sort", "unbox")
    """Tasks whose `train`-split demonstrations make up the dataset (one goal-conditioned policy)."""
    demos_per_task: int = 400
    """Demonstration episodes per task; generated into `data_dir` when missing."""
    data_dir: str = "data"
    """Folder of RLDS datasets, one per task and split."""
    demo_noise: float = 0.02
    """Actuation noise std while recording demonstrations (DART): the data then shows recoveries.
    0.1 stops the operator from ever grasping (it centres within 4 mm); see envs/demos.py NOISE."""
    demo_bursts: float = 0.03
    """Probability per step of a random push during demonstrations (recovery data; envs/demos.py)."""
    steps: int = 40_000
    """Gradient steps."""
    batch_size: int = 256
    """Examples per step, split across devices."""
    optimizer: AdamW = AdamW()
    """The optimizer (its decay runs over `steps`)."""
    nll_weight: float = 0.01
    """Weight of the likelihood term that calibrates the policy's std."""
    log_every: int = 250
    """Steps per jitted block; metrics are fetched and logged once per block."""
    eval_every: int = 5_000
    """Steps between MJX evaluations on both splits (0: only at the end)."""
    eval_episodes: int = 32
    """Episodes per task and split in the periodic evaluations."""
    checkpoint_every: int = 2_500
    """Steps between checkpoints."""
    keep_checkpoints: int = 3
    """Checkpoints kept on disk (the newest)."""
    seed: int = 0
    """Seed of parameter init, batch sampling and evaluation."""

    def __post_init__(self) -> None:
        for name in ("log_every", "checkpoint_every"):
            every = getattr(self, name)
            if every < 1 or (name != "log_every" and every % self.log_every):
                raise ValueError(f"PretrainConfig.{name}={every} must be a positive multiple of log_every")
        if self.steps % self.log_every:
            raise ValueError(f"PretrainConfig.steps={self.steps} must be a multiple of log_every")
        if self.eval_every % self.log_every:
            raise ValueError(f"PretrainConfig.eval_every={self.eval_every} must be a multiple of log_every")


@dataclasses.dataclass(frozen=True)
class SACConfig:
    """The off-policy actor-critic over action chunks (RLPD / HIL-SERL recipe) that patching runs."""

    batch_size: int = 256
    """Transitions per update, drawn from the sources by `mix` and split across devices."""
    mix: tuple[float, float, float] = (0.25, 0.5, 0.25)
    """Share of each batch from the offline, online and patch sources (normalised; an empty source's
    share is masked out of the losses)."""
    utd: int = 4
    """Critic updates per actor update, fused in one `lax.scan` (RLPD's update-to-data ratio)."""
    gamma: float = 0.97
    """Discount per control step; an H-step chunk backs up with gamma^H."""
    tau: float = 0.005
    """Target critic EMA rate."""
    target_subset: int = 2
    """Critic ensemble members in the target's min: 0 (or >= ensemble size) takes the min over all of
    them, 2 with an ensemble of 10 is REDQ's random-subset min."""
    init_alpha: float = 0.01
    """Initial entropy temperature."""
    target_entropy_per_dim: float = -2.5
    """Entropy target per action dimension of the chunk. HIL-SERL's -0.5 let the temperature push the
    prior's std up until the policy collapsed; the prior sits near -2.4."""
    actor_lr: float = 3e-4
    critic_lr: float = 3e-4
    alpha_lr: float = 3e-4
    bc_weight: float = 10.0
    """Weight of the behaviour-cloning term on operator data in the actor loss."""
    bc_sources: tuple[str, ...] = ("patch", "offline")
    """Sources whose chunks the BC term imitates; "offline" keeps the `train` skills (patch alone: 0%
    on `train` after 6 rounds)."""
    nll_weight: float = 0.01
    """Likelihood weight inside the BC term (as in pretraining)."""
    critic_warmup: int = 1000
    """The full actor: critic updates before it starts moving (a random critic would drag the prior
    anywhere). The residual has its own, `residual_critic_warmup`."""
    actor: Literal["residual", "full"] = "residual"
    """What patching trains. "residual": a one-step correction on the frozen prior, executed action =
    prior + residual_scale x residual, scored by a critic of the executed step with an n-step return
    (`learner/residual.py`). "full": the whole chunk policy against a chunk critic (`learner/sac.py`, the
    earlier learner, kept for the ablation). The fleet learner exports whole policies and runs "full"."""
    residual_scale: float = 0.4
    """Residual: the largest correction per action dimension, in units of the action range's half-width
    (a held item needs about 0.4 of v_max to slow down)."""
    residual_valve_scale: float = 2.0
    """Residual: the largest correction of the suction valve's command (the action's last dimension). Its
    command is a sign, so 2 (the whole range) lets the residual open or close it wherever the prior holds
    it; at 0.4 the residual could never change the valve."""
    ensemble: int = 10
    """Residual: critic ensemble size (RLPD / REDQ: 10, targets from the min over `target_subset`)."""
    pessimism: float = 1.0
    """Residual: the actor maximises mean - pessimism x std over the critic ensemble, not its mean."""
    residual_select: bool = True
    """Residual: execute the patched action only where the critic's pessimistic value rates it above the
    prior's own action, the prior's elsewhere (IBRL); the deployed params then carry the critic. On
    `deploy` it kept the train component at 94% (90% without) and took patching from 79.2% to 81.8%
    (docs/learner.md)."""
    residual_select_target: bool = False
    """Residual with `residual_select`: bootstrap the TD target from the action the selecting policy would
    run at s_{t+n}, the prior's or the patched one, whichever the target critic's pessimistic value rates
    higher (IBRL's target), so the critic values the policy that executes; off: from the patched action.
    On `deploy`, over 5 seeds, the final rose from 82.2% to 84.1% (paired mean +1.9, bootstrap 95%
    [-0.3, +4.1]) with last-3 means 80.2% and 80.7%: not separated, so off (docs/learner.md)."""
    residual_actor_lr: float = 3e-4
    """Residual: the actor's learning rate (1e-4 moved the residual by 0.04 of the action range in 1,000
    steps, too little to change an outcome)."""
    residual_target_entropy_per_dim: float = -2.0
    """Residual: entropy target per action dimension of the residual (its initial std is e^-2)."""
    residual_bc_weight: float = 10.0
    """Residual: weight of the BC term, which fits the residual to (operator - prior) / scale."""
    residual_critic_warmup: int = 0
    """Residual: TD critic updates before the actor moves. The Monte-Carlo pretraining already gives the
    actor a settled critic; 1,000 warm-up updates held the actor until round 2."""
    actor_polyak: float = 0.01
    """Residual: EMA rate of the averaged actor that is evaluated, gated and deployed."""
    critic_pretrain_steps: int = 2000
    """Residual: Monte-Carlo regression steps of the critic on the offline data and the first round,
    before any TD update or actor step."""

    def __post_init__(self) -> None:
        if len(self.mix) != 3 or min(self.mix) < 0 or sum(self.mix) <= 0:
            raise ValueError(f"SACConfig.mix needs 3 non-negative shares with a positive sum, got {self.mix}")
        unknown = set(self.bc_sources) - {"offline", "online", "patch"}
        if unknown:
            raise ValueError(f"SACConfig.bc_sources: unknown sources {sorted(unknown)}")


@dataclasses.dataclass(frozen=True)
class PatchConfig:
    """Interactive policy patching (Cortex 1.5): the prior deployed, operator takeovers, SAC updates."""

    rounds: int = 16
    """Rounds of rollout -> learner updates -> evaluation."""
    envs_per_round: int = 16
    """Episodes rolled out (with operator takeover) per round."""
    updates_per_round: int = 200
    """Fused train steps per round (each: `sac.utd` critic updates and one actor update)."""
    validation_episodes: int = 128
    """Fixed validation contexts, disjoint from the test ones: what "rounds to reach X" reads."""
    goal: float = 0.9
    """Success on the validation contexts that effort-to-goal is measured to."""
    offline_episodes: int = 200
    """The task's `train` demonstrations loaded into the offline source."""
    capacity: tuple[int, int, int] = (65_536, 262_144, 65_536)
    """Transitions held by the offline, online and patch buffers."""
    explore: bool = True
    """Sample chunks from the policy during rollouts (False: its deterministic mode)."""
    risk_trigger: float = 0.0
    """Operator trigger besides `operator.*`: take over when the state-only PRO in `pro` predicts a failure
    within Δ steps with probability over this (0: off)."""
    false_alarms: bool = True
    """Replay each round's contexts without the operator to count takeovers the policy did not need."""
    baselines: tuple[Literal["sft", "targeted_sft", "hg_dagger"], ...] = ("sft", "targeted_sft", "hg_dagger")
    """Comparison arms: full SFT retraining on demonstrations of the split, targeted SFT on demonstrations
    of its tail components, HG-DAgger (BC on the operator's takeover segments)."""
    sft_demos: tuple[int, ...] = (8, 16, 32, 64, 128)
    """SFT arms: operator demonstrations, one BC retraining from the prior per count."""
    sft_steps: int = 1500
    """BC steps of each SFT retraining and of each HG-DAgger round (from the prior)."""
    hg_dagger_rounds: int = 8
    """HG-DAgger: rounds of `envs_per_round` operator-watched episodes of the current BC policy."""
    operator_share: float = 0.0
    """Share of each BC retraining batch (SFT, HG-DAgger, the residual's base) drawn from the operator's
    data, the demonstrations or the takeover steps so far; the rest come from the offline demonstrations.
    0: every example alike, so the operator's few hundred steps are a few percent of the draws."""
    base: Literal["prior", "hg_dagger"] = "hg_dagger"
    """The residual's base policy: the prior retrained by BC each round on the offline demonstrations and
    every takeover step so far (HG-DAgger's policy; IBRL's BC half), with the residual and the critic's
    selection on top; or the frozen prior ("prior"; `sac.actor` "full" needs it). On `deploy`, 3 seeds:
    87.2% against 81.8% on the frozen prior (docs/learner.md)."""
    reward: Literal["operator", "pro"] = "operator"
    """The learner's reward: the operator's sparse success label, or that label plus PRO's potential-based
    shaping β(γΦ(s') - Φ(s)) (`pro`; `pro.shaping` is β, `pro.shaping_risk` the λ in Φ = V - λρ)."""
    pro: str = "runs/pro"
    """Run folder of the trained process-reward model (`jaxvla pro train`), read when reward is "pro"."""
    gate: bool = True
    """Publish (deploy and report) a round's params only if their validation success is not below the
    published params' by more than `gate_margin`; otherwise the published params stay."""
    gate_margin: float = 0.02
    """Tolerated validation drop of the gate at 128 validation contexts; at n it is scaled like the binomial
    standard error, by sqrt(128 / n) (`learner.patch.gate_tolerance`: 4 points at 32 contexts)."""

    def __post_init__(self) -> None:
        if not 0 < self.goal <= 1:
            raise ValueError(f"PatchConfig.goal must be in (0, 1], got {self.goal}")
        if not 0.0 <= self.operator_share < 1.0:
            raise ValueError(f"PatchConfig.operator_share must lie in [0, 1), got {self.operator_share}")


@dataclasses.dataclass(frozen=True)
class ProConfig:
    """The Process-Reward Operator (Cortex 1.6): what it reads, how it is labelled, trained and used."""

    net: ProNetConfig = ProNetConfig()
    """The network."""
    collect_episodes: int = 256
    """Episodes per kind of deployment `collect` logs: the prior on train, on novel (sampled chunks),
    and on novel with operator takeovers."""
    datasets: tuple[str, ...] = (
        "{task}_train",
        "{task}_novel",
        "pro/{task}_prior_train",
        "pro/{task}_prior_{split}",
        "pro/{task}_takeover_{split}",
    )
    """RLDS datasets under `pretrain.data_dir` it trains on ({task} and {split}, `collect_split`, are
    filled in): scripted, pretrained, patched and failed episodes."""
    collect_split: str = "novel"
    """Split of the prior's logged deployments besides `train`, alone and with takeovers (`collect`)."""
    heldout: float = 0.2
    """Fraction of episodes (by episode-id hash) held out for evaluation."""
    gamma: float = 0.97
    """Discount of the implicit-reward return the progress value predicts."""
    time_cost: float = 0.005
    """Implicit reward per step (cycle time)."""
    retry_cost: float = 0.05
    """Implicit reward per retry."""
    safety_cost: float = 0.1
    """Implicit reward per slip, drop or collision event."""
    failure_cost: float = 1.0
    """Implicit reward of a failed episode's last step (success earns +1)."""
    risk_horizon: int = 5
    """Δ: steps ahead the risk head looks for a failure."""
    comparison_weight: float = 0.5
    """Weight of the episode-comparison loss."""
    comparison_temperature: float = 0.1
    """Value gap that makes a comparison confident (logit = gap / temperature)."""
    faster_margin_s: float = 0.5
    """Cycle-time gap [s] that ranks one success faster than another."""
    steps: int = 4000
    """Gradient steps."""
    batch_size: int = 256
    """Windows per step (half anchors, half partners)."""
    optimizer: AdamW = AdamW(warmup_steps=200)
    """The optimizer (its decay runs over `steps`; an on-policy refresh runs its peak rate, no warm-up)."""
    log_every: int = 250
    """Steps per jitted block; metrics are logged once per block."""
    risk_threshold: float = 0.5
    """rho above which the risk alarm is on (lead time)."""
    risk_weight: float = 0.5
    """λ in the dense reward Δp - λρ, the ranking score V - λρ and the episode score."""
    rank_samples: int = 8
    """K: candidate chunks ranked per step (the deterministic chunk and K - 1 samples)."""
    rank_margins: tuple[float, ...] = (0.0, 0.02, 0.05, 0.1, 0.2)
    """Scores that may be credited to the deterministic chunk when ranking (a sampled chunk replaces it
    only when PRO rates it higher by more than this). The validation contexts choose among them and
    infinity, the policy alone (`learner.pro.choose_margin`)."""
    rank_significance: float = 0.05
    """A margin replaces the policy alone only when it beats it on the validation contexts by a paired sign
    test at this level, Bonferroni-corrected over `rank_margins`."""
    shaping: float = 1.0
    """β: weight of the potential-based shaping β(γΦ(s') - Φ(s)) added to the sparse reward (state-only
    PRO, `--pro.net.no-action-input`)."""
    shaping_risk: float = 0.0
    """λ inside the shaping potential Φ = V - λρ (0: progress alone; choose it on the validation set)."""
    conservative: float = 0.0
    """α of the Cal-QL term that keeps an action-conditioned PRO's values of chunks off the data at or
    below the logged return (0: off; V-GPS uses 5). For ranking."""
    conservative_samples: int = 4
    """Chunks off the data per example in the Cal-QL term: half uniform, half the logged one plus noise."""
    conservative_noise: float = 0.3
    """Standard deviation of the noise added to logged chunks in the Cal-QL term."""
    refresh_steps: int = 0
    """Gradient steps of each on-policy refresh of PRO on the current policy's episodes (`pro.refresh`; 0:
    PRO stays frozen). Off by default: with the critic's selection, 100 steps a round cost 11 points on
    `deploy` against the frozen PRO (72.1% against 83.3%, 3 seeds, docs/pro.md)."""
    gate_success: float = 0.2
    """A retry is stopped when q_t, the predicted success, is below this."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.batch_size % 2 or self.steps % self.log_every:
            raise ValueError("ProConfig: batch_size must be even and steps a multiple of log_every")
        if not 0 < self.rank_significance <= 1:
            raise ValueError(f"ProConfig.rank_significance must be in (0, 1], got {self.rank_significance}")

    def dataset_names(self, task: str) -> tuple[str, ...]:
        """`datasets` for `task` (`target.task`)."""
        return tuple(name.format(task=task, split=self.collect_split) for name in self.datasets)


@dataclasses.dataclass(frozen=True)
class RecapConfig:
    """Recap (pi*0.6): advantage-conditioned retraining from autonomous rollouts and operator corrections."""

    iterations: int = 4
    """Iterations of collect -> value -> advantages -> policy -> evaluate."""
    autonomous_per_iteration: int = 32
    """Episodes per iteration run by the policy alone (indicator positive)."""
    corrected_per_iteration: int = 32
    """Episodes per iteration with the scripted operator ready to take over (`operator.*`)."""
    offline_episodes: int = 200
    """The task's `train` demonstrations in the dataset from the start (the paper's D_demo)."""
    explore: bool = True
    """Sample chunks from the policy while collecting (False: its deterministic mode)."""
    c_fail: float = 1.0
    """Failure penalty, in units of the task's maximum episode length (1: a failure is worth at most -1,
    the bottom of the value's support)."""
    advantage_steps: int = 10
    """N of the N-step advantage: 10 control steps is 1 s, the paper's N = 50 at 50 Hz."""
    positive_fraction: float = 0.4
    """Share of the collected steps whose indicator is positive, set per task by quantile (the paper's
    ~40% in fine-tuning)."""
    demo_positive_fraction: float = 0.3
    """The same share for the offline demonstrations (the paper's ~30% in pretraining)."""
    indicator_dropout: float = 0.3
    """Probability that a training example's indicator is replaced by "none" (classifier-free training)."""
    guidance: float = 1.0
    """Classifier-free guidance weight beta at inference (1: the conditioned policy alone)."""
    from_prior: bool = True
    """Retrain value and policy from their initial weights every iteration (the paper), not from the last."""
    value_steps: int = 1000
    """Value-function steps per iteration."""
    policy_steps: int = 2000
    """Policy steps per iteration."""
    batch_size: int = 256
    """Examples per value or policy step."""
    learning_rate: float = 3e-4
    """Peak AdamW learning rate of both networks."""
    demo_share: float = 0.5
    """Share of each value and policy batch drawn from the demonstrations' replay source, so corrections
    are not drowned in `train` demonstrations. The rest comes from the autonomous and the corrected
    rollouts' sources, in proportion to `autonomous_per_iteration` and `corrected_per_iteration` (all of
    it when there are no demonstrations)."""
    guidance_sweep: tuple[float, ...] = (1.0, 1.5, 2.5)
    """Classifier-free guidance weights beta the final policy is evaluated at on the test contexts."""

    def __post_init__(self) -> None:
        for name in ("positive_fraction", "demo_positive_fraction", "indicator_dropout", "demo_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"RecapConfig.{name} must lie in [0, 1], got {getattr(self, name)}")
        if self.autonomous_per_iteration + self.corrected_per_iteration < 1:
            raise ValueError("RecapConfig: collect at least one episode per iteration")


@dataclasses.dataclass(frozen=True)
class RiptConfig:
    """RIPT-VLA: group policy gradient from binary success, K rollouts per initial state."""

    sft_demos: int = 0
    """0: start from the prior. N > 0: first retrain it by BC on N operator demonstrations of the split
    (plus the offline ones), the paper's few-shot SFT stage that RIPT then improves."""
    sft_share: float = 0.0
    """Share of the few-shot SFT examples that come from those N demonstrations, which are repeated to reach
    it; the rest are the `train` demonstrations. 0: both simply concatenated, so that one demonstration is
    about 0.5% of the examples and BC barely sees it."""
    iterations: int = 10
    """Iterations of rollouts -> PPO epochs -> evaluation."""
    group_size: int = 16
    """K: rollouts per context, from the replicated initial state."""
    groups_per_call: int = 4
    """Contexts per jitted rollout call (groups_per_call * group_size envs at once)."""
    rollouts_per_iteration: int = 256
    """The fixed rollout budget per iteration; rejected groups spend it too. A multiple of
    groups_per_call * group_size."""
    contexts: int = 64
    """Initial states of the split drawn once per run (the context dataset)."""
    skip_rounds: int = 3
    """Iterations a context is skipped after a group of it all succeeded."""
    execute: int = 1
    """Actions of each sampled chunk executed before the policy samples again (1: receding horizon, as
    the evaluation runs; the chunk size: open loop). The log-probability covers the executed part."""
    temperature: float = 1.0
    """Scale of the policy's std while sampling rollouts (and in the ratio); evaluation uses the mean."""
    epochs: int = 4
    """PPO passes over each iteration's kept decisions."""
    minibatches: int = 4
    """PPO steps per epoch, each on a random 1/minibatches of the iteration's decisions (rejected ones
    weigh 0), so the number of steps does not grow with the padding."""
    learning_rate: float = 5e-6
    """Adam learning rate (on the 4-demo SFT start, 1e-5 clipped 28% of the decisions in an iteration's
    16 steps, 3e-6 12%)."""
    clip_low: float = 0.2
    """PPO clip below 1 (epsilon)."""
    clip_high: float = 0.2
    """PPO clip above 1."""
    rl_std: float = 0.06
    """Initial std of RIPT's own likelihood: a state-independent std per action dimension (pre-tanh),
    beside the network, which samples rollouts and scores the PPO ratio. BC leaves the network's own std at
    its floor (e^-5), where PPO's clip lets an iteration move the mean by about 0.001. On pick_place/deploy
    the default prior's sampled rollouts succeed 62% at 0.05, 25% at 0.08 and 2% at 0.15 (its mean chunk:
    70%), keeping 62%, 88% and 25-38% of groups (`--ript.probe-stds`)."""
    rl_std_floor: float = 0.02
    """Lower bound of that std."""
    std_learning_rate: float = 1e-3
    """Adam learning rate of the log-std (the network's is `learning_rate`)."""
    kl_coef: float = 0.05
    """Weight of KL(pi || pi_start), the likelihood's KL to the run's starting policy (QueST's RIPT: 0.05)."""
    starts: tuple[int, ...] = ()
    """`jaxvla ript`: run from each of these starts, demonstration counts: 0 is the prior on `target.split`,
    N > 0 few-shot SFT on N demonstrations of `few_shot_split`, then RIPT there. Empty: one start, `sft_demos`
    on `split`."""
    few_shot_split: Split = "novel"
    """Split of the few-shot starts in `starts`."""
    probe_stds: tuple[float, ...] = ()
    """`jaxvla ript`: instead of training, roll out the start from every context at each of these RL stds
    and report the sampled rollouts' success and the share of groups dynamic sampling would keep."""

    def __post_init__(self) -> None:
        per_call = self.groups_per_call * self.group_size
        if self.group_size < 2:
            raise ValueError(f"RiptConfig.group_size must be at least 2 (leave-one-out): {self.group_size}")
        if self.rollouts_per_iteration < per_call or self.rollouts_per_iteration % per_call:
            raise ValueError(
                f"RiptConfig.rollouts_per_iteration={self.rollouts_per_iteration} must be a "
                f"positive multiple of groups_per_call * group_size = {per_call}"
            )
        if self.contexts < self.groups_per_call:
            raise ValueError("RiptConfig.contexts must be at least groups_per_call")
        if not 0.0 <= self.sft_share < 1.0:
            raise ValueError(f"RiptConfig.sft_share must lie in [0, 1), got {self.sft_share}")
        if not 0.0 < self.rl_std_floor <= self.rl_std <= 1.0:
            raise ValueError(
                f"RiptConfig: need 0 < rl_std_floor <= rl_std <= 1, got {self.rl_std_floor}, {self.rl_std}"
            )


@dataclasses.dataclass(frozen=True)
class FleetConfig:
    """The fleet (`jaxvla serve`): the service robots push episodes to, and the learner behind it that
    ingests them into replay, patches the prior with SAC (`sac.*`, `patch.capacity`,
    `patch.updates_per_round`) and publishes gated params. The prior (`target.prior`) is the first
    published version; `target.task` and `target.split` are the task and the gate's item distribution."""

    root: str = "runs/fleet"
    """Folder of the episode store, the params registry, the learner's checkpoints and logs: a local path
    or an `etils.epath` URL such as gs://bucket/fleet (README, "Beyond one machine")."""
    host: str = "127.0.0.1"
    port: int = 8765
    tokens: str = ""
    """JSON file {robot_id: token}; empty: `<root>/tokens.json`, created with `robots` tokens if absent."""
    robots: int = 4
    """Robots given a token when the tokens file is created."""
    max_body_mb: int = 64
    """Largest request body the service reads (413 above)."""
    max_episodes_per_push: int = 64
    max_steps: int = 2_000
    """Longest episode the service accepts (422 above)."""
    compact_every: int = 256
    """Committed episodes that wait before the service converts them into RLDS parts."""
    part_episodes: int = 256
    """Most episodes in one RLDS part: a backlog is compacted part by part, and shutdown waits for none."""
    max_infer_batch: int = 256
    """Largest observation batch the policy websocket runs (422 above)."""
    page_host: str = "127.0.0.1"
    """Address of the read-only fleet page (no token: keep it on loopback unless a proxy guards it)."""
    page_port: int = 8766
    """Port of the fleet page; 0: no page."""
    offline_data: str = "data/{task}_train"
    """RLDS dataset loaded into the offline source (`patch.offline_episodes` of it; {task} is
    `target.task`); empty: none."""
    ingest_episodes: int = 4
    """Episodes per replay insert: a fixed group size makes the replay a function of the store's order."""
    episodes_per_round: int = 16
    """New episodes that start a learner round (updates, gate, publish, checkpoint)."""
    rounds: int = 0
    """Learner rounds before it exits (0: until stopped)."""
    gate: str = "sim"
    """Regression gate: "sim" (success in the C twin on held-out seeds), "sim+pro" (and PRO's episode score
    of the same episodes), or one registered in `learner.fleet.gate.GATES`."""
    gate_margin: float = 0.05
    """A candidate is published unless its score is below the current params' by more than this."""
    pro: str = ""
    """Run folder of the PRO (`jaxvla pro train`) whose episode score the "sim+pro" gate monitors."""
    pro_margin: float = 0.05
    """Tolerated drop of the mean PRO episode score (V - λρ, in units of the value's return)."""
    pro_risk_weight: float = 0.5
    """λ of the PRO episode score."""
    gate_episodes: int = 32
    """Held-out episodes of the simulated gate."""
    gate_seed: int = 1_000_000_000
    """First seed of the gate's held-out episodes (actors draw theirs far below)."""
    poll_s: float = 1.0
    """Seconds the learner waits when the store has nothing new."""
    learner: bool = True
    """`jaxvla serve` also runs the learner (a supervised child process, restarted if it dies)."""
    seed: int = 0
    """Seed of the learner's keys."""

    def __post_init__(self) -> None:
        if self.part_episodes < 1 or self.max_infer_batch < 1:
            raise ValueError("FleetConfig.part_episodes and max_infer_batch must be at least 1")
        if self.ingest_episodes < 1 or self.episodes_per_round % self.ingest_episodes:
            raise ValueError("FleetConfig.episodes_per_round must be a multiple of ingest_episodes (>= 1)")


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """`jaxvla demo`: the seeds' methods compared end to end on `target.task` / `target.split`."""

    robots: int = 3
    """Numpy robots (C-MuJoCo twins) that deploy the prior through the fleet service; the last one has the
    operator as its teleop device."""
    episodes_per_robot: int = 16
    """Episodes each robot runs with the prior; their logs are PRO's deployment data."""
    trigger_rounds: int = 2
    """Rounds of patching with PRO-triggered takeovers (the other patching arms run `patch.rounds`)."""
    budget_min: float = 15.0
    """Minutes the job should take from a fresh clone, install included; the report says how it did."""
    lanes: int = 2
    """2: sparse patching, SFT, HG-DAgger, Recap and RIPT (they need only the prior) run in a second
    process beside the others, so compiling keeps both cores of a small machine busy; 1: one process, one
    stage at a time (each stage's wall-clock then stands alone)."""

    def __post_init__(self) -> None:
        if self.lanes not in (1, 2):
            raise ValueError(f"DemoConfig.lanes must be 1 or 2, got {self.lanes}")


@dataclasses.dataclass(frozen=True)
class Config:
    """One experiment: a named starting point plus one section per part of the system."""

    name: str
    """Registry name; also names the run's output folder."""
    description: str
    """One line shown in `--help` next to the name."""
    env: EnvConfig
    """The simulated workcell."""
    target: TargetConfig = TargetConfig()
    """The prior, task, split, seeds and test contexts every job works on."""
    operator: Trigger = Trigger()
    """When the scripted operator takes over and hands back (patching, Recap's corrected episodes, PRO's
    logged takeovers)."""
    model: ModelConfig = ModelConfig()
    """Policy, critic and value networks."""
    pretrain: PretrainConfig = PretrainConfig()
    """Behaviour-cloning pretraining of the prior."""
    sac: SACConfig = SACConfig()
    """The actor-critic that fine-tunes the prior."""
    patch: PatchConfig = PatchConfig()
    """Interactive policy patching."""
    pro: ProConfig = ProConfig()
    """The process-reward model."""
    recap: RecapConfig = RecapConfig()
    """Recap: advantage-conditioned retraining."""
    ript: RiptConfig = RiptConfig()
    """RIPT: group policy gradient from binary success."""
    fleet: FleetConfig = FleetConfig()
    """The fleet service and its learner."""
    demo: DemoConfig = DemoConfig()
    """The main job: every method compared."""
    out_dir: str = "runs"
    """Folder for checkpoints, logs and plots."""
    compile_cache: str = COMPILE_CACHE
    """Folder for JAX's persistent compilation cache, so reruns skip compiling."""


_CONFIGS = (
    Config(
        name="default",
        description="Full-size simulation run.",
        env=EnvConfig(num_envs=256),
    ),
    Config(
        name="debug",
        description="Tiny shapes, for tests and a first look; runs in seconds on a laptop CPU.",
        env=EnvConfig(num_envs=4),
        model=ModelConfig(width=32, prompt_dim=8, ensemble=2, value_bins=11),
        pretrain=PretrainConfig(
            demos_per_task=4,
            steps=40,
            batch_size=16,
            optimizer=AdamW(warmup_steps=5),
            log_every=10,
            eval_every=20,
            eval_episodes=4,
            checkpoint_every=20,
        ),
    ),
    Config(
        name="demo",
        description="`jaxvla demo`: every method on small budgets, one seed; under 15 min on a 2-core CPU.",
        env=EnvConfig(num_envs=64),
        target=TargetConfig(seeds=(0,), eval_episodes=32),
        pretrain=PretrainConfig(
            tasks=("pick_place",),
            # 600 demonstrations and 8000 steps: 75.0% on 128 deploy test contexts, 96.8% on its train
            # component; 200 and 3000 left it at 51.6% (docs/demo.md).
            demos_per_task=600,
            steps=8000,
            eval_every=0,
            checkpoint_every=1000,
        ),
        patch=PatchConfig(
            rounds=3,
            validation_episodes=32,
            offline_episodes=200,
            sft_demos=(32,),
            sft_steps=1000,
            hg_dagger_rounds=2,
            false_alarms=False,  # not in the demo's table: saves replaying every round without the operator
        ),
        pro=ProConfig(
            datasets=("{task}_train", "{task}_{split}", "pro/{task}_fleet"),
            steps=400,
            batch_size=128,
            optimizer=AdamW(warmup_steps=50),
            log_every=200,
        ),
        recap=RecapConfig(
            iterations=2,
            autonomous_per_iteration=8,
            corrected_per_iteration=16,
            offline_episodes=200,
            value_steps=300,
            policy_steps=600,
        ),
        ript=RiptConfig(
            sft_demos=4,
            iterations=2,
            rollouts_per_iteration=128,
            contexts=32,
        ),
        out_dir="runs/demo",
    ),
    Config(
        name="demo_full",
        description="`jaxvla demo --full`: every method on larger budgets, three seeds, mean ± std.",
        env=EnvConfig(num_envs=64),
        target=TargetConfig(seeds=(0, 1, 2), eval_episodes=128),
        pretrain=PretrainConfig(
            tasks=("pick_place",),
            demos_per_task=600,
            steps=10_000,
            eval_every=0,
            checkpoint_every=2500,
        ),
        patch=PatchConfig(rounds=6, sft_demos=(16, 32, 64), sft_steps=1500, hg_dagger_rounds=6),
        pro=ProConfig(
            datasets=("{task}_train", "{task}_{split}", "pro/{task}_fleet"), steps=750, batch_size=128
        ),
        recap=RecapConfig(iterations=2, value_steps=500, policy_steps=1000),
        ript=RiptConfig(sft_demos=4, iterations=3, rollouts_per_iteration=128),
        demo=DemoConfig(robots=4, episodes_per_robot=48, trigger_rounds=6, budget_min=60.0),
        out_dir="runs/demo_full",
    ),
    Config(
        name="vla",
        description="VLA-scale policy (~100M parameters): RGB-D patch tokens and a transformer; for GPUs.",
        env=EnvConfig(num_envs=256, camera=True),
        model=ModelConfig(
            encoder="transformer",
            width=768,
            layers=14,
            attention_heads=12,
            image=True,
            image_res=64,
            patch_size=8,
            dtype="bfloat16",
        ),
        pretrain=PretrainConfig(batch_size=256, optimizer=AdamW(learning_rate=1e-4), nll_weight=0.01),
    ),
    Config(
        name="vla_tiny",
        description="The VLA-scale code path at tiny width, for CPU tests.",
        env=EnvConfig(num_envs=4, camera=True),
        model=ModelConfig(
            encoder="transformer",
            width=32,
            layers=2,
            attention_heads=4,
            image=True,
            image_res=16,
            patch_size=8,
        ),
        pretrain=PretrainConfig(
            tasks=("pick_place",),
            demos_per_task=4,
            steps=20,
            batch_size=8,
            optimizer=AdamW(warmup_steps=2),
            log_every=10,
            eval_every=0,
            eval_episodes=2,
            checkpoint_every=10,
        ),
    ),
)


def index_by_name(configs: Iterable[Config]) -> dict[str, Config]:
    """Maps name -> config; raises ValueError naming any duplicates."""
    by_name: dict[str, Config] = {}
    duplicates = []
    for config in configs:
        if config.name in by_name:
            duplicates.append(config.name)
        by_name[config.name] = config
    if duplicates:
        raise ValueError(f"Config names must be unique; duplicated: {sorted(set(duplicates))}")
    return by_name


# Built at import, so a duplicate name fails as soon as anything imports configs.
_CONFIGS_BY_NAME = index_by_name(_CONFIGS)


def list_configs() -> tuple[str, ...]:
    """Registered config names, in registry order."""
    return tuple(_CONFIGS_BY_NAME)


def get_config(name: str) -> Config:
    """The registered config called `name`; KeyError with the closest name as a suggestion otherwise."""
    if name in _CONFIGS_BY_NAME:
        return _CONFIGS_BY_NAME[name]
    close = difflib.get_close_matches(name, _CONFIGS_BY_NAME, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"choose from: {', '.join(_CONFIGS_BY_NAME)}."
    raise KeyError(f"No config named {name!r}; {hint}")


# The sections of `Config`; a command reads some of them, and always `out_dir` and `compile_cache`.
_HINTS = typing.get_type_hints(Config)
SECTIONS = tuple(name for name, hint in _HINTS.items() if dataclasses.is_dataclass(hint))


def with_defaults(config: Config, defaults: dict[str, dict]) -> Config:
    """`config` with fields of its sections replaced: `{section: {field: value}}`."""
    sections = {name: dataclasses.replace(getattr(config, name), **new) for name, new in defaults.items()}
    return dataclasses.replace(config, **sections)


def cli(
    argv: Sequence[str],
    prog: str | None = None,
    sections: Sequence[str] = SECTIONS,
    defaults: dict[str, dict] | None = None,
) -> Config:
    """Parses `<config name> [--section.field value ...]` into a Config; exits with help on bad input.

    Only `sections`, the ones the command reads, are parsed and listed by `--help`; a flag of any other
    section exits with an error instead of being ignored. `defaults` (`{section: {field: value}}`) replace
    fields in every named config, so `--help` shows the command's own defaults and the command line still
    overrides them. The sections not read keep the named config's values.
    """
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown config sections {sorted(unknown)}; choose from {SECTIONS}")
    reject_unread(argv, sections, prog or "jaxvla")
    # A subclass whose unread fields tyro neither parses nor shows; the rest keep Config's docstrings. Each
    # named config is passed whole, so the subclass gives every field a placeholder default.
    names = [field.name for field in dataclasses.fields(Config)]
    shown = (*sections, "out_dir", "compile_cache")
    fields = [
        (name, _HINTS[name] if name in shown else typing.Annotated[_HINTS[name], tyro.conf.Suppress], None)
        for name in names
    ]
    view = dataclasses.make_dataclass("Config", fields, bases=(Config,), frozen=True)
    view.__doc__ = Config.__doc__
    choices = {}
    for config in _CONFIGS:
        config = with_defaults(config, defaults or {})
        choices[config.name] = (config.description, view(**{name: getattr(config, name) for name in names}))
    parsed = tyro.extras.overridable_config_cli(choices, prog=prog, args=argv)
    return Config(**{name: getattr(parsed, name) for name in names})


def reject_unread(argv: Sequence[str], sections: Sequence[str], prog: str) -> None:
    """Exits naming the first `--section.field` flag of a section the command does not read."""
    for arg in argv:
        section = arg.removeprefix("--").partition("=")[0].partition(".")[0].replace("-", "_")
        if not arg.startswith("--") or section not in SECTIONS or section in sections:
            continue
        if section == "model":
            raise SystemExit(
                f"{prog}: the model comes from the prior (`--target.prior`), so {arg} would change nothing; "
                "set it when pretraining (`jaxvla pretrain --model.*`)"
            )
        raise SystemExit(
            f"{prog} does not read the {section} section ({arg}); it reads {', '.join(sections)}."
        )
