"""A batched RGB-D camera by ray casting: one `mjx.ray` per pixel, vmapped (docs/mjx-on-cpu.md).

MJX has no rasteriser, but casting H*W rays against the scene's few geoms is cheap on a CPU and is a
pure function of (model, data), so it jits and vmaps over a batch of envs like the physics does.
"""

import dataclasses

import jax
import jax.numpy as jnp
import mujoco
import numpy as np
from mujoco import mjx

CAMERA = "overview"
MAX_DEPTH = 3.0  # [m] depth of pixels that hit nothing, and the clip for those that do
BACKGROUND = (0.62, 0.72, 0.85)  # sky-ish RGB where no geom is hit
FADE = 0.45  # fraction of brightness lost at MAX_DEPTH: far things read darker, so edges show


@dataclasses.dataclass(frozen=True)
class Camera:
    """A fixed pinhole camera; holds only static numpy arrays, so it is safe to close over under jit."""

    origin: np.ndarray  # [3] world position
    directions: np.ndarray  # [H*W, 3] unit world-frame ray per pixel, row-major from the top-left
    height: int
    width: int

    @classmethod
    def create(cls, mj_model: mujoco.MjModel, res: int, name: str = CAMERA) -> "Camera":
        """The model's camera `name` as a `res` x `res` image. It must be fixed to the world body."""
        cam = mj_model.cam(name)
        if int(cam.bodyid[0]) != 0:
            raise ValueError(f"camera {name!r} must be attached to the world body (pos/quat are then global)")
        rot = np.zeros(9)
        mujoco.mju_quat2Mat(rot, cam.quat)
        rot = rot.reshape(3, 3)  # columns: the camera's x (right), y (up), z (backwards) in world frame
        half = np.tan(np.deg2rad(float(cam.fovy[0])) / 2)  # fovy is vertical; the image is square
        # Pixel centres in [-1, 1]; row 0 is the top of the image, so it looks up (+y).
        u = (np.arange(res) + 0.5) / res * 2 - 1
        x, y = np.meshgrid(u * half, -u * half)  # [H, W] each
        local = np.stack([x, y, -np.ones_like(x)], axis=-1).reshape(-1, 3)  # MuJoCo cameras look along -z
        world = local @ rot.T
        world /= np.linalg.norm(world, axis=-1, keepdims=True)
        return cls(np.asarray(cam.pos, np.float32), world.astype(np.float32), res, res)

    def render(self, model: mjx.Model, data: mjx.Data) -> jax.Array:
        """[H, W, 4] float32: RGB in [0, 1] (geom colour faded with distance), then depth [m] up to MAX_DEPTH.

        Needs `data` after kinematics (geom_xpos/geom_xmat), as after `mjx.forward` or `mjx.step`.
        """
        origin = jnp.asarray(self.origin)
        cast = jax.vmap(lambda direction: mjx.ray(model, data, origin, direction))
        dist, geom = cast(jnp.asarray(self.directions))  # [H*W] each; -1 where nothing is hit
        hit = geom >= 0
        depth = jnp.where(hit, jnp.minimum(dist, MAX_DEPTH), MAX_DEPTH)
        colour = model.geom_rgba[jnp.maximum(geom, 0), :3] * (1 - FADE * depth / MAX_DEPTH)[:, None]
        rgb = jnp.where(hit[:, None], colour, jnp.asarray(BACKGROUND, jnp.float32))
        image = jnp.concatenate([rgb, depth[:, None]], axis=-1).astype(jnp.float32)
        return image.reshape(self.height, self.width, 4)
