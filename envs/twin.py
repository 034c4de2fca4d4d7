"""The C-MuJoCo twin of the MJX workcell: the same scene, the same formulas, mujoco and numpy only.

Robot-side actors run this (it never imports jax). It compiles the same MJCF (`scene.py`) and calls
the same `cell.py` functions with numpy, so observations, telemetry, events and rewards are computed by
one piece of code in both simulators; only the physics engine differs (C MuJoCo in float64 here, MJX in
float32 there).
"""

import mujoco
import numpy as np

from envs import cell as C
from envs import operator
from envs import scene as _scene
from envs.tasks import CellConfig
from envs.tasks import get_task


class Twin:
    """One task on one split in C MuJoCo; `reset` and `step` mirror `Workcell`, statefully."""

    def __init__(self, task: str, split: str = "train", config: CellConfig | None = None):
        self.spec = get_task(task)
        self.split = split
        self.mixture = self.spec.split(split)
        self.ranges = self.mixture.hull
        self.config = config or self.spec.default_config
        self.model, self.ids = _scene.compile_model(self.spec, self.ranges, self.config)
        self.data = mujoco.MjData(self.model)
        self.layout = C.Layout.create(self.spec, self.config)
        self._prompts = self.spec.prompt_tokens()
        self._item_base = _scene.item_base(self.model, self.ids, self.ranges)
        self._rng = np.random.default_rng(0)
        self.state: C.State | None = None

    def sample_params(self) -> C.Params:
        u = self._rng.random(C.N_UNIFORMS)
        u_component = self._rng.random()
        return C.sample_params(np, u, self.spec, self.mixture, self.config, self._prompts, u_component)

    def reset(self, seed: int | None = None, params: C.Params | None = None) -> C.State:
        """Starts an episode; `params` (e.g. from an MJX reset) replays a given episode exactly."""
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        params = self.sample_params() if params is None else C.Params(*(np.asarray(p) for p in params))
        mass, inertia, size, friction = C.episode_model_values(np, params, self.ranges, *self._item_base)
        b, g = self.ids.item_body, self.ids.item_geom
        self.model.body_mass[b], self.model.body_inertia[b] = mass, inertia
        self.model.geom_size[g], self.model.geom_friction[g] = size, friction
        mujoco.mj_resetDataKeyframe(self.model, self.data, self.model.key("home").id)
        self.data.qpos[self.ids.item_qpos : self.ids.item_qpos + 3] = params.item_start
        mujoco.mj_forward(self.model, self.data)
        cell = C.initial_cell(np, self.layout)
        kin = C.read_kin(np, self.data, self.ids)
        info = C.finish_step(np, cell, kin, params, C.no_flags(np), self.layout, self.config)[4]
        info.update(stage=np.int32(0), cycle_time=np.float32(0), success=np.bool_(False))
        obs = self._observe(kin, cell, params)
        false = np.bool_(False)
        self.state = C.State(self.data, obs, np.float32(0), false, false, info, params, cell, self._rng)
        return self.state

    def step(self, action) -> C.State:
        """Advances one control step. action [4] in [-1, 1], as in the MJX env."""
        state = self.state
        cell, start, flags = C.apply_action(np, state.cell, np.asarray(action, np.float32), self.config)
        n = self.config.substeps
        for k in range(n):
            kin = C.read_kin(np, self.data, self.ids)
            cell, forces, new = C.substep(np, cell, kin, state.params, self.layout, self.config)
            self.data.xfrc_applied[:] = 0
            self.data.xfrc_applied[self.ids.item_body] = forces.item
            self.data.xfrc_applied[self.ids.gantry_body] = forces.gantry
            if self.layout.has_lid:
                self.data.xfrc_applied[self.ids.lid_body] = forces.lid
            self.data.ctrl[:] = start + (k + 1) / n * (cell.setpoint - start)
            mujoco.mj_step(self.model, self.data)
            flags = C.merge_flags(np, flags, new)
        kin = C.read_kin(np, self.data, self.ids)
        cell, reward, done, truncated, info = C.finish_step(
            np, cell, kin, state.params, flags, self.layout, self.config
        )
        obs = self._observe(kin, cell, state.params)
        self.state = C.State(self.data, obs, reward, done, truncated, info, state.params, cell, self._rng)
        return self.state

    def operator_action(self) -> np.ndarray:
        """The scripted operator's action for the current state."""
        kin = C.read_kin(np, self.data, self.ids)
        return operator.act(np, kin, self.state.cell, self.state.params, self.layout, self.config)

    def _observe(self, kin: C.Kin, cell: C.Cell, params: C.Params) -> dict:
        noise = self._rng.standard_normal(C.N_OBS_NOISE)
        return C.observe(np, kin, cell, params, noise, self.layout, self.config)
