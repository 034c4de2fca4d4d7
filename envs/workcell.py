"""The MJX workcell: a pure, jittable env with `reset(key) -> State` and `step(state, action) -> State`.

Physics is `mjx.step`; everything else (suction, telemetry, events, reward, observation) is `cell.py`
called with `jax.numpy`. Per-episode item mass, size and friction are model fields, so `step` rebuilds
the few affected fields from `state.params` (cheap under jit, and it makes a batch of envs with
different items a plain `vmap` over states).
"""

import dataclasses

import jax
import jax.numpy as jnp
from mujoco import mjx

from envs import cell as C
from envs import operator
from envs import scene as _scene
from envs.cell import State
from envs.tasks import COLOUR_RGBA
from envs.tasks import CellConfig
from envs.tasks import get_task

# A pytree: batch it with `vmap`, carry it through `lax.scan`.
jax.tree_util.register_dataclass(
    State, data_fields=[f.name for f in dataclasses.fields(State)], meta_fields=[]
)


class Workcell:
    """One task on one split, compiled once; instances are cheap to share and safe to close over."""

    def __init__(self, task: str, split: str = "train", config: CellConfig | None = None):
        self.spec = get_task(task)
        self.split = split
        self.mixture = self.spec.split(split)
        self.ranges = self.mixture.hull
        self.config = config or self.spec.default_config
        self.mj_model, self.ids = _scene.compile_model(self.spec, self.ranges, self.config)
        self.layout = C.Layout.create(self.spec, self.config)
        self.model = mjx.put_model(self.mj_model)
        self._prompts = jnp.asarray(self.spec.prompt_tokens())
        data = mjx.make_data(self.model)
        key = self.mj_model.key("home")
        # time starts weakly typed in mjx.make_data; a strong float32 keeps jit from compiling twice.
        self._data0 = data.replace(
            qpos=jnp.asarray(key.qpos, jnp.float32),
            ctrl=jnp.asarray(key.ctrl, jnp.float32),
            time=jnp.float32(0),
        )
        self._item_base = _scene.item_base(self.mj_model, self.ids, self.ranges)
        self._camera = None
        if self.config.camera:
            from envs import camera

            self._camera = camera.Camera.create(self.mj_model, self.config.camera_res)

    @property
    def name(self) -> str:
        return f"{self.spec.name}/{self.split}"

    @property
    def action_size(self) -> int:
        return 4

    # ---------------------------------------------------------------------------------------- reset
    def sample_params(self, key: jax.Array) -> C.Params:
        u = jax.random.uniform(key, (C.N_UNIFORMS,))
        # A key of its own for the component, so `train` and `novel` draw the contexts they always drew.
        u_component = jax.random.uniform(jax.random.fold_in(key, 1))
        return C.sample_params(jnp, u, self.spec, self.mixture, self.config, self._prompts, u_component)

    def reset(self, key: jax.Array) -> State:
        key_params, key_state = jax.random.split(key)
        return self.reset_from_params(key_state, self.sample_params(key_params))

    def reset_from_params(self, key: jax.Array, params: C.Params) -> State:
        """Starts an episode with given parameters (domain randomisation and replays use this)."""
        ids = self.ids
        qpos = self._data0.qpos.at[ids.item_qpos : ids.item_qpos + 3].set(params.item_start)
        data = mjx.forward(self.episode_model(params), self._data0.replace(qpos=qpos))
        cell = C.initial_cell(jnp, self.layout)
        kin = C.read_kin(jnp, data, ids)
        key, key_noise = jax.random.split(key)
        obs = self._observe(data, kin, cell, params, key_noise)
        info = C.finish_step(jnp, cell, kin, params, C.no_flags(jnp), self.layout, self.config)[4]
        info = {**info, "stage": jnp.int32(0), "cycle_time": jnp.float32(0), "success": jnp.bool_(False)}
        false = jnp.bool_(False)
        return State(data, obs, jnp.float32(0), false, false, info, params, cell, key)

    # ----------------------------------------------------------------------------------------- step
    def step(self, state: State, action: jax.Array) -> State:
        """Advances one control step (`config.substeps` physics steps). action [4] in [-1, 1]."""
        model = self.episode_model(state.params)
        cell, start, flags = C.apply_action(jnp, state.cell, jnp.asarray(action, jnp.float32), self.config)
        n = self.config.substeps
        xfrc0 = jnp.zeros_like(state.data.xfrc_applied)

        def physics_substep(carry, k):
            data, cell, flags = carry
            kin = C.read_kin(jnp, data, self.ids)
            cell, forces, new = C.substep(jnp, cell, kin, state.params, self.layout, self.config)
            xfrc = xfrc0.at[self.ids.item_body].set(forces.item).at[self.ids.gantry_body].set(forces.gantry)
            if self.layout.has_lid:
                xfrc = xfrc.at[self.ids.lid_body].set(forces.lid)
            ctrl = start + (k + 1) / n * (cell.setpoint - start)
            data = mjx.step(model, data.replace(ctrl=ctrl, xfrc_applied=xfrc))
            return (data, cell, C.merge_flags(jnp, flags, new)), None

        (data, cell, flags), _ = jax.lax.scan(
            physics_substep, (state.data, cell, flags), jnp.arange(n, dtype=jnp.float32)
        )
        kin = C.read_kin(jnp, data, self.ids)
        cell, reward, done, truncated, info = C.finish_step(
            jnp, cell, kin, state.params, flags, self.layout, self.config
        )
        key, key_noise = jax.random.split(state.key)
        obs = self._observe(data, kin, cell, state.params, key_noise)
        return State(data, obs, reward, done, truncated, info, state.params, cell, key)

    def operator_action(self, state: State) -> jax.Array:
        """The scripted operator's action [4] for this state (it reads privileged simulator state)."""
        kin = C.read_kin(jnp, state.data, self.ids)
        return operator.act(jnp, kin, state.cell, state.params, self.layout, self.config)

    # -------------------------------------------------------------------------------------- helpers
    def episode_model(self, params: C.Params) -> mjx.Model:
        """The model this episode steps: the compiled cell with its item's mass, size and friction."""
        mass, inertia, size, friction = C.episode_model_values(jnp, params, self.ranges, *self._item_base)
        m, b, g = self.model, self.ids.item_body, self.ids.item_geom
        fields = {
            "body_mass": m.body_mass.at[b].set(mass),
            "body_inertia": m.body_inertia.at[b].set(inertia),
            "geom_size": m.geom_size.at[g].set(size),
            "geom_friction": m.geom_friction.at[g].set(friction),
        }
        if self._camera is not None:  # only the camera sees colours and bin positions
            fields["geom_rgba"] = m.geom_rgba.at[g].set(jnp.asarray(COLOUR_RGBA)[params.colour])
            bins = jnp.asarray(self.ids.bin_bodies)
            xy = params.bins[: len(self.ids.bin_bodies), :2]
            fields["body_pos"] = m.body_pos.at[bins, :2].set(xy)
        return m.replace(**fields)

    def _observe(self, data, kin, cell, params, key) -> dict:
        noise = jax.random.normal(key, (C.N_OBS_NOISE,))
        obs = C.observe(jnp, kin, cell, params, noise, self.layout, self.config)
        if self._camera is not None:
            obs["image"] = self._camera.render(self.episode_model(params), data)
        return obs
