"""A small gymnasium robot for the robot-side tests, laid out as LeRobot's gym-hil Panda is: a nested Dict
observation, Box(7) actions (xyz, rotation, gripper) and success in `info["succeed"]`. The arm moves its
tip towards a cube; an episode ends on reaching it or after `steps` steps. Importing this module
registers it as `JaxvlaReach-v0`, so `gymnasium.make` (and examples/gym_robot.py --env) finds it.
"""

import gymnasium as gym
import numpy as np
from gymnasium import spaces

ENV_ID = "JaxvlaReach-v0"


class ReachEnv(gym.Env):
    def __init__(self, steps: int = 5):
        self.steps, self.resets = steps, 0
        box = lambda n: spaces.Box(-1.0, 1.0, (n,), np.float32)  # noqa: E731
        self.observation_space = spaces.Dict(
            {"agent": spaces.Dict({"pos": box(3), "vel": box(3)}), "cube": box(3)}
        )
        self.action_space = box(7)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.resets += 1
        self.t, self.vel = 0, np.zeros(3, np.float32)
        self.pos = self.np_random.uniform(-0.5, 0.5, 3).astype(np.float32)
        self.cube = self.np_random.uniform(-0.5, 0.5, 3).astype(np.float32)
        return self._obs(), {"succeed": False}

    def step(self, action):
        self.t += 1
        self.vel = 0.1 * np.asarray(action[:3], np.float32)
        self.pos = np.clip(self.pos + self.vel, -1.0, 1.0)
        distance = float(np.linalg.norm(self.pos - self.cube))
        succeed = distance < 0.05
        return self._obs(), -distance, succeed, self.t >= self.steps and not succeed, {"succeed": succeed}

    def _obs(self) -> dict:
        return {"agent": {"pos": self.pos.copy(), "vel": self.vel.copy()}, "cube": self.cube.copy()}


gym.register(id=ENV_ID, entry_point=ReachEnv)
