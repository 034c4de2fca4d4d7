"""`jaxvla reach [config] [--target.field value ...]`: how much of the operator's takeovers a residual can
express, at several scales.

Rolls the prior (`target.prior`, deterministic) on `target.task` / `target.split` under the operator's
triggers (`operator.*`) for `target.eval_episodes` episodes, then, for each scale, the share of the
operator's steps whose correction (operator - prior) / scale leaves the residual's range in some dimension
and the share of the correction's size that the clip loses (`learner.residual.correction_reach`), by
mixture component. The last row is the scale `jaxvla patch` uses (`sac.residual_scale` on the motion,
`sac.residual_valve_scale` on the suction valve).
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np

import configs
from envs.tasks import get_task
from learner import compile_cache
from learner import evaluate
from learner import patch
from learner import pretrain
from learner import residual

PROG = "jaxvla reach"
UNIFORM_SCALES = (0.2, 0.4, 1.0, 2.0)


def main(argv: list[str]) -> int:
    config = configs.cli(argv, PROG, sections=("target", "operator", "sac"))
    compile_cache.enable(config.compile_cache)
    config, prior = pretrain.load_target(config, PROG)
    tc = config.target
    actor = evaluate.chunk_actor(prior.graphdef, prior.stats)
    collector = patch.Collector(tc.task, tc.split, tc.eval_episodes, config.operator, actor)
    rolled = jax.device_get(collector(prior.params, evaluate.VALIDATION.key, 0))
    block = rolled["block"]
    operator = np.asarray(block["intervention"])
    obs = jax.tree.map(lambda x: np.asarray(x)[operator], block["obs"])
    executed = jnp.asarray(np.asarray(block["action"])[operator])
    base = actor(prior.params, obs, jax.random.key(0))
    component = np.broadcast_to(np.asarray(rolled["component"])[:, None], operator.shape)[operator]
    names = get_task(tc.task).split(tc.split).component_names
    valve_flips = np.mean((np.asarray(executed)[:, -1] > 0) != (np.asarray(base)[:, -1] > 0))
    episodes = int(operator.any(1).sum())
    print(
        f"{int(operator.sum())} operator steps in {episodes} of {tc.eval_episodes} episodes of "
        f"{tc.task}/{tc.split}; the valve's sign changed on {valve_flips:.1%} of them"
    )
    print("| scale | " + " | ".join(f"{n}: outside / lost" for n in ("all", *names)) + " |")
    print("|---|" + "---:|" * (len(names) + 1))
    size = prior.model.action_size
    for scale in (*((s,) * size for s in UNIFORM_SCALES), residual.action_scale(config.sac, size)):
        cells = []
        for i in range(-1, len(names)):
            mask = jnp.asarray(component == i) if i >= 0 else jnp.ones(len(component), bool)
            reach = residual.correction_reach(executed, base, scale, mask)
            cells.append(f"{float(reach['share_outside']):.0%} / {float(reach['lost_fraction']):.0%}")
        print(f"| {', '.join(f'{s:g}' for s in scale)} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
