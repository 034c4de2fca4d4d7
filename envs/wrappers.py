"""Wrappers over the MJX workcell: batching, auto-reset, domain randomisation and operator takeover.

Each keeps the env interface (`reset(key) -> State`, `step(state, action) -> State`), so they stack:
`VmapWrapper(AutoReset(Takeover(DomainRandomization(Workcell(...)))), 256)`.
"""

import dataclasses

import jax
import jax.numpy as jnp

from envs.cell import State
from envs.operator import Trigger
from envs.operator import takeover_alarm
from envs.operator import takeover_flags
from envs.operator import takeover_start

__all__ = [
    "AutoReset",
    "DomainRandomization",
    "Randomization",
    "Takeover",
    "Trigger",
    "VmapWrapper",
    "Wrapper",
]


class Wrapper:
    """Forwards everything it does not override to the wrapped env.

    Both ways of starting an episode go through `_start`, so a wrapper that adds to the first state
    (info keys, say) overrides that one hook and no reset path can skip it.
    """

    def __init__(self, env):
        self.env = env

    def __getattr__(self, name):
        # Only reached when normal lookup fails. copy.copy and unpickling make the object without
        # __init__ and then ask it for __setstate__ and friends: forwarding those, or reading `self.env`
        # before it is set, would call this method again without end.
        if name.startswith("__") or "env" not in vars(self):
            raise AttributeError(name)
        return getattr(self.env, name)

    def reset(self, key: jax.Array) -> State:
        return self._start(self.env.reset(key))

    def reset_from_params(self, key: jax.Array, params) -> State:
        return self._start(self.env.reset_from_params(key, params))

    def _start(self, state: State) -> State:
        return state


class VmapWrapper(Wrapper):
    """A batch of `batch_size` independent envs; states and actions carry a leading [B] axis."""

    def __init__(self, env, batch_size: int):
        super().__init__(env)
        self.batch_size = batch_size

    def reset(self, key: jax.Array) -> State:
        return jax.vmap(self.env.reset)(jax.random.split(key, self.batch_size))

    def reset_from_params(self, keys: jax.Array, params) -> State:
        """keys [B], params with leading [B] axes."""
        return jax.vmap(self.env.reset_from_params)(keys, params)

    def step(self, state: State, action: jax.Array) -> State:
        return jax.vmap(self.env.step)(state, action)


class AutoReset(Wrapper):
    """Starts a new episode inside `step` when one ends.

    The returned state keeps the finished transition's reward, done, truncated and info (so learners see
    how the episode ended) and carries the new episode's data, observation and parameters; the last
    observation of the finished episode is in `info["final_obs"]`, for bootstrapping on truncation.
    """

    def _start(self, state: State) -> State:
        return dataclasses.replace(state, info={**state.info, "final_obs": state.obs})

    def step(self, state: State, action: jax.Array) -> State:
        new = self.env.step(state, action)
        key_next, key_reset = jax.random.split(new.key)
        fresh = self.env.reset(key_reset)
        ended = new.done | new.truncated
        pick = lambda a, b: jnp.where(ended, a, b)  # noqa: E731
        return State(
            data=jax.tree.map(pick, fresh.data, new.data),
            obs=jax.tree.map(pick, fresh.obs, new.obs),
            reward=new.reward,
            done=new.done,
            truncated=new.truncated,
            info={**new.info, "final_obs": new.obs},
            params=jax.tree.map(pick, fresh.params, new.params),
            cell=jax.tree.map(pick, fresh.cell, new.cell),
            key=key_next,
        )


@dataclasses.dataclass(frozen=True)
class Randomization:
    """Multiplicative ranges for physical constants a real cell does not know exactly."""

    p_max: tuple[float, float] = (0.85, 1.1)
    pump_tau: tuple[float, float] = (0.7, 1.4)
    obs_noise: tuple[float, float] = (0.5, 2.0)
    item_mass: tuple[float, float] = (0.9, 1.1)
    item_friction: tuple[float, float] = (0.8, 1.2)


class DomainRandomization(Wrapper):
    """Perturbs each episode's vacuum system, sensing and item physics on top of the task's split."""

    def __init__(self, env, ranges: Randomization = Randomization()):
        super().__init__(env)
        self.ranges = ranges

    def reset(self, key: jax.Array) -> State:
        key_params, key_scale, key_state = jax.random.split(key, 3)
        params = self.env.sample_params(key_params)
        names = [f.name for f in dataclasses.fields(self.ranges)]
        u = jax.random.uniform(key_scale, (len(names),))
        scaled = {}
        for i, name in enumerate(names):
            lo, hi = getattr(self.ranges, name)
            scaled[name] = getattr(params, name) * (lo + (hi - lo) * u[i])
        return self.env.reset_from_params(key_state, params._replace(**scaled))


DEFAULT_TRIGGER = Trigger()


class Takeover(Wrapper):
    """Human-in-the-loop corrections in simulation: the scripted operator replaces the policy's action.

    `step(state, policy_action)` executes the operator's action while an intervention is active. The info
    records `policy_action`, the executed `action` and `is_intervention` for every step, which is what
    the replay's patch source and the RLDS episode need. With `trigger.lookahead`, `policy(state) ->
    action` is rolled ahead from each state to predict a failure before it shows.

    The operator can be switched off per episode (`with_operator`): it then never takes over, as under a
    trigger that never fires, yet the episode runs in the same compiled program as those it watches.
    """

    def __init__(self, env, trigger: Trigger = DEFAULT_TRIGGER, policy=None):
        super().__init__(env)
        if trigger.lookahead and policy is None:
            raise ValueError("a look-ahead trigger needs the policy to roll ahead: Takeover(policy=...)")
        self.trigger, self.policy = trigger, policy

    def _start(self, state: State) -> State:
        action = jnp.zeros(self.env.action_size, jnp.float32)
        extra = {
            **takeover_start(jnp),
            "operator_on": jnp.bool_(True),
            "policy_action": action,
            "action": action,
        }
        return dataclasses.replace(state, info={**state.info, **extra})

    @staticmethod
    def with_operator(state: State, on) -> State:
        """`state` with the operator switched on or off for the rest of its episode; `on` is [] or, for a
        batch of states, [B]. An episode starts with it on."""
        on = jnp.broadcast_to(jnp.asarray(on, bool), state.info["operator_on"].shape)
        return dataclasses.replace(state, info={**state.info, "operator_on": on})

    def step(self, state: State, policy_action: jax.Array) -> State:
        predicted = self.predicted_failure(state) if self.trigger.lookahead else False
        return self.take_step(state, policy_action, predicted)

    def take_step(self, state: State, policy_action: jax.Array, predicted, **recorded) -> State:
        """One step under the protocol, given whether a failure is `predicted` ahead: the operator acts if it
        is already in control or the alarm goes off (never while it is switched off), and `recorded`
        ({name: value}) joins the step's info. Wrappers with triggers of their own (PRO's risk) call this."""
        operator = self.env.operator_action(state)
        alarm = takeover_alarm(jnp, self.trigger, state.info, policy_action, operator, predicted)
        alarm = alarm & state.info["operator_on"]
        action = jnp.where(state.info["intervening"] | alarm, operator, policy_action)
        new = self.env.step(state, action)
        flags = takeover_flags(jnp, self.trigger, state.info, alarm, new.info["stage"], new.done)
        extra = {
            **flags,
            "operator_on": state.info["operator_on"],
            "policy_action": policy_action,
            "action": action,
            **recorded,
        }
        return dataclasses.replace(new, info={**new.info, **extra})

    def predicted_failure(self, state: State) -> jax.Array:
        """Whether the policy, left alone for `trigger.lookahead` steps, fails or is about to slip."""

        def ahead(carry, _):
            s, failed = carry
            new = self.env.step(s, self.policy(s))
            s = dataclasses.replace(new, info={**s.info, **new.info})  # the carry keeps this wrapper's keys
            risky = (s.info["slip"] > self.trigger.slip) | (s.info["contact_force"] > self.trigger.force)
            return (s, failed | (s.done & ~s.info["success"]) | risky), None

        (_, failed), _ = jax.lax.scan(ahead, (state, jnp.bool_(False)), None, self.trigger.lookahead)
        return failed


class History(Wrapper):
    """Keeps the last `length` observations and executed actions in `info["history"]`, oldest first, with
    a `valid` flag (False before the episode's first step): what a model over a window of steps reads."""

    def __init__(self, env, length: int):
        super().__init__(env)
        self.length = length

    def _start(self, state: State) -> State:
        empty = lambda x: jnp.zeros((self.length, *jnp.shape(x)), jnp.asarray(x).dtype)  # noqa: E731
        history = {
            "obs": jax.tree.map(empty, state.obs),
            "action": jnp.zeros((self.length, self.env.action_size), jnp.float32),
            "valid": jnp.zeros(self.length, bool),
        }
        return dataclasses.replace(state, info={**state.info, "history": history})

    def step(self, state: State, action: jax.Array) -> State:
        new = self.env.step(state, action)
        executed = new.info.get("action", action)  # a Takeover below may have replaced the action
        push = lambda buffer, x: jnp.concatenate([buffer[1:], jnp.asarray(x, buffer.dtype)[None]])  # noqa: E731
        old = state.info["history"]
        history = {
            "obs": jax.tree.map(push, old["obs"], state.obs),
            "action": push(old["action"], executed),
            "valid": push(old["valid"], True),
        }
        return dataclasses.replace(new, info={**new.info, "history": history})
