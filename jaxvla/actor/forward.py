"""The numpy forward pass of `jaxvla.models.heads.Policy`, rebuilt from an export's model spec and arrays.

Each class mirrors one flax/jax op the models use, computing in float32 throughout: `nnx.Linear`
(x @ kernel + bias), `nnx.LayerNorm` (flax's fast variance E[x^2] - E[x]^2, clipped at 0, eps 1e-6),
SiLU, `nnx.Embed`, `nnx.Conv` (VALID, stride 2, NHWC, kernel HWIO) and `jax.nn.dot_product_attention`
(scale 1/sqrt(head_dim), masked keys at -0.7 * float32 max, softmax in float32). Where the arithmetic is
rearranged for speed (SiLU through tanh, halved LayerNorm parameters and the centring folded into the
weights in MLPs, the padding row zeroed instead of masked, only the readout token in the last transformer
block) it is the same maths, exact or to float32 rounding; `tests/test_actor.py` checks the result
against the jitted JAX forward pass for both encoders (within 1e-5 of the unit scale; measured <= 4e-6).

Weights are looked up by their flat NNX path once, when the pass is built, and their shapes checked
against the spec, so a file that does not match its spec fails at load rather than mid-episode.
A spec with `dtype` "bfloat16" still runs here in float32 (it then agrees with JAX to bfloat16 rounding).

numpy, `jaxvla.schema` and `jaxvla.tokenizer` only.
"""

import math

import numpy as np

from jaxvla import tokenizer
from jaxvla.actor.fileformat import PolicyFileError
from jaxvla.schema import INDICATOR_VALUES

# A copy of `jaxvla.models.layers.LAYER_NORM_EPS`: that module pulls in jax, which this one must not
# import; tests/test_actor.py checks they agree.
LAYER_NORM_EPS = 1e-6
# jax.nn.dot_product_attention's fill for masked logits.
MASKED_LOGIT = np.float32(-0.7 * np.finfo(np.float32).max)

F32 = np.float32


# ------------------------------------------------------------------------------------------- ops
def silu(x: np.ndarray) -> np.ndarray:
    """x * sigmoid(x), written with tanh so that no exp can overflow: sigmoid(x) = (1 + tanh(x/2)) / 2."""
    t = np.tanh(x * F32(0.5))
    t += F32(1.0)
    t *= x
    t *= F32(0.5)
    return t


class Linear:
    """nnx.Linear: [..., in] -> [..., out]."""

    def __init__(self, kernel: np.ndarray, bias: np.ndarray):
        self.kernel, self.bias = kernel, bias

    def __call__(self, x: np.ndarray) -> np.ndarray:
        y = np.dot(x, self.kernel)  # for a 2-D kernel, matmul's result with less dispatch
        return np.add(y, self.bias, out=y)


class LayerNorm:
    """nnx.LayerNorm over the last axis, with flax's fast variance and its order of operations."""

    def __init__(self, scale: np.ndarray, bias: np.ndarray):
        self.scale, self.bias = scale, bias
        self.n = F32(scale.shape[0])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        mean = np.add.reduce(x, axis=-1, keepdims=True) / self.n
        var = np.maximum(np.add.reduce(x * x, axis=-1, keepdims=True) / self.n - mean * mean, F32(0.0))
        mul = self.scale * (F32(1.0) / np.sqrt(var + F32(LAYER_NORM_EPS)))
        y = x - mean
        y *= mul
        y += self.bias
        return y


class MLP:
    """layers.MLP: (Linear -> LayerNorm -> SiLU) per layer, rearranged for few numpy calls per layer.

    - LayerNorm's centring, z - mean(z), is linear in the layer's input, so it is folded into the weights:
      kernel and bias have their mean over the outputs subtracted (in float64, rounded once), and the
      matmul returns the centred z. Its variance is then E[z^2], which is flax's E[x^2] - E[x]^2 to
      float32 rounding (and never negative).
    - SiLU(y) = y (1 + tanh(y/2)) / 2 = h + h tanh(h) with h = y/2, so each LayerNorm gets its scale and
      bias halved (exact in binary floating point) and returns h directly.
    At batch 1 a 256-wide layer's matmul takes about as long as eight small numpy calls, so the calls are
    what these save; for one example the variance is a Python float.
    """

    def __init__(self, layers: list[tuple[Linear, LayerNorm]]):
        self.layers = []
        for linear, norm in layers:
            kernel, bias = linear.kernel.astype(np.float64), linear.bias.astype(np.float64)
            self.layers.append(
                (
                    np.ascontiguousarray(kernel - kernel.mean(axis=1, keepdims=True), F32),
                    (bias - bias.mean()).astype(F32),
                    norm.scale * F32(0.5),
                    norm.bias * F32(0.5),
                    1.0 / norm.scale.shape[0],
                )
            )

    def __call__(self, x: np.ndarray) -> np.ndarray:
        for kernel, bias, half_scale, half_bias, inv_n in self.layers:
            z = np.dot(x, kernel)
            z += bias
            if z.ndim == 1:
                z *= 1.0 / math.sqrt(float(np.dot(z, z)) * inv_n + LAYER_NORM_EPS)
            else:
                var = np.add.reduce(z * z, axis=-1, keepdims=True)
                var *= F32(inv_n)
                var += F32(LAYER_NORM_EPS)
                z /= np.sqrt(var, out=var)
            z *= half_scale
            z += half_bias
            x = np.tanh(z)
            x *= z
            x += z
        return x


class Conv:
    """nnx.Conv, VALID, stride 2, NHWC: [..., H, W, in] -> [..., (H-kh)//2+1, (W-kw)//2+1, out]."""

    def __init__(self, kernel: np.ndarray, bias: np.ndarray):
        kh, kw, cin, cout = kernel.shape
        self.size = (kh, kw)
        # HWIO flattened to [(kh, kw, in), out]: the order `__call__` concatenates each window's pixels in.
        self.kernel, self.bias = np.ascontiguousarray(kernel.reshape(kh * kw * cin, cout)), bias

    def __call__(self, x: np.ndarray) -> np.ndarray:
        h, w = x.shape[-3:-1]
        kh, kw = self.size
        ho, wo = (h - kh) // 2 + 1, (w - kw) // 2 + 1
        windows = [
            x[..., i : i + 2 * ho - 1 : 2, j : j + 2 * wo - 1 : 2, :] for i in range(kh) for j in range(kw)
        ]
        y = np.concatenate(windows, axis=-1) @ self.kernel
        y += self.bias
        return y


def prompt_mask(prompt: np.ndarray) -> np.ndarray:
    """[..., L] bool: True on real words."""
    return prompt != tokenizer.PAD


def patchify(image: np.ndarray, patch: int) -> np.ndarray:
    """encoders.patchify: [B, H, W, C] -> [B, (H/p)*(W/p), p*p*C], row-major over patches."""
    b, h, w, c = image.shape
    x = image.reshape(b, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


def softmax(x: np.ndarray) -> np.ndarray:
    """jax.nn.softmax over the last axis."""
    e = np.exp(x - np.max(x, axis=-1, keepdims=True))
    e /= np.add.reduce(e, axis=-1, keepdims=True)
    return e


# -------------------------------------------------------------------------------------- encoders
class StateEncoder:
    """encoders.StateEncoder: state MLP, bag-of-words prompt, optional depth CNN, fused by an MLP."""

    def __init__(self, w: "Weights", model: dict, state_size: int):
        width, prompt_dim = model["width"], model["prompt_dim"]
        self.state = w.mlp("encoder/state", state_size, (width, width))
        embed = w.array("encoder/prompt/embed/embedding", (len(tokenizer.VOCABULARY), prompt_dim))
        # One more column of ones, and the padding row zeroed: summing all of a prompt's rows is then the
        # masked sum JAX computes, with the word count in its last entry.
        self.embed = np.concatenate([embed, np.ones((len(embed), 1), F32)], axis=1)
        self.embed[tokenizer.PAD] = 0.0
        self.convs = []
        fused = width + prompt_dim
        if model["image"]:
            sizes = (1, *model["cnn_channels"])
            for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
                prefix = f"encoder/depth/convs/{i}"
                kernel, bias = w.array(f"{prefix}/kernel", (3, 3, a, b)), w.array(f"{prefix}/bias", (b,))
                self.convs.append(Conv(kernel, bias))
            fused += sizes[-1]
        self.fuse = w.mlp("encoder/fuse", fused, (width,))

    def __call__(self, obs: dict) -> np.ndarray:
        words = np.add.reduce(self.embed.take(obs["prompt"], axis=0), axis=-2)
        parts = [self.state(obs["state"]), words[..., :-1] / np.maximum(words[..., -1:], F32(1.0))]
        if self.convs:
            x = obs["image"][..., 3:4]
            for conv in self.convs:
                x = silu(conv(x))
            parts.append(np.add.reduce(x, axis=(-3, -2)) / F32(x.shape[-3] * x.shape[-2]))
        return self.fuse(np.concatenate(parts, axis=-1))


class TransformerBlock:
    """layers.TransformerBlock: pre-LayerNorm attention and MLP, both residual."""

    def __init__(self, w: "Weights", prefix: str, width: int, heads: int, mlp_ratio: int):
        self.heads = heads
        self.scale = F32(1.0 / np.sqrt(width // heads))
        self.norm_attention = w.norm(f"{prefix}/norm_attention", width)
        self.qkv = w.linear(f"{prefix}/qkv", width, 3 * width)
        self.out = w.linear(f"{prefix}/out", width, width)
        self.norm_mlp = w.norm(f"{prefix}/norm_mlp", width)
        self.up = w.linear(f"{prefix}/up", width, mlp_ratio * width)
        self.down = w.linear(f"{prefix}/down", mlp_ratio * width, width)

    def __call__(self, x: np.ndarray, key_mask: np.ndarray, readout_only: bool = False) -> np.ndarray:
        """x [B, N, D], key_mask [B, 1, 1, N] -> [B, N, D], or [B, 1, D] (token 0) if `readout_only`.

        Token 0 attends to every token but no later computation reads the other tokens' outputs, so
        the last block computes token 0 alone.
        """
        b, n, d = x.shape
        hd = d // self.heads
        qkv = self.qkv(self.norm_attention(x)).reshape(b, n, 3, self.heads, hd)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, N, heads, hd]
        if readout_only:
            q, x = q[:, :1], x[:, :1]
        logits = q.transpose(0, 2, 1, 3) @ k.transpose(0, 2, 3, 1)  # [B, heads, T, N]
        logits *= self.scale
        probs = softmax(np.where(key_mask, logits, MASKED_LOGIT))
        attended = (probs @ v.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)  # [B, T, heads, hd]
        x = x + self.out(attended.reshape(b, -1, d))
        return x + self.down(silu(self.up(self.norm_mlp(x))))


class TransformerEncoder:
    """encoders.TransformerEncoder: [readout, state, prompt words, patches] tokens -> readout [B, width]."""

    def __init__(self, w: "Weights", model: dict, state_size: int):
        width = model["width"]
        self.patch = model["patch_size"] if "patch_size" in model else model["patch"]  # older manifests
        patches = (model["image_res"] // self.patch) ** 2 if model["image"] else 0
        tokens = 2 + tokenizer.PROMPT_LENGTH + patches
        self.readout = w.array("encoder/readout", (width,))
        self.position = w.array("encoder/position", (tokens, width))
        self.state = w.linear("encoder/state", state_size, width)
        self.words = w.array("encoder/words/embedding", (len(tokenizer.VOCABULARY), width))
        self.patches = w.linear("encoder/patches", self.patch**2 * 4, width) if patches else None
        self.blocks = [
            TransformerBlock(w, f"encoder/blocks/{i}", width, model["attention_heads"], model["mlp_ratio"])
            for i in range(model["layers"])
        ]
        self.norm = w.norm("encoder/norm", width)

    def __call__(self, obs: dict) -> np.ndarray:
        if obs["prompt"].ndim == 1:  # one example: the attention below is written for a batch
            return self({k: v[None] for k, v in obs.items()})[0]
        prompt = obs["prompt"]
        batch, width = prompt.shape[0], self.readout.shape[0]
        readout = np.broadcast_to(self.readout, (batch, 1, width))
        tokens = [readout, self.state(obs["state"])[:, None], self.words[prompt]]
        mask = [np.ones((batch, 2), bool), prompt_mask(prompt)]
        if self.patches is not None:
            patches = self.patches(patchify(obs["image"], self.patch))
            tokens.append(patches)
            mask.append(np.ones(patches.shape[:2], bool))
        x = np.concatenate(tokens, axis=1) + self.position
        key_mask = np.concatenate(mask, axis=1)[:, None, None, :]
        for i, block in enumerate(self.blocks):
            x = block(x, key_mask, readout_only=i == len(self.blocks) - 1)
        return self.norm(x[:, 0])


# ---------------------------------------------------------------------------------------- policy
class PolicyForward:
    """(normalised obs, indicator or None) -> (mean, log_std), float32.

    obs: "state" [S] (the schema's STATE_KEYS vectors concatenated), "prompt" [L] int, "image" [H, W, 4]
    if the model reads it; indicator []; outputs [H, A]. Or a batch: a leading [B] on all of them.
    """

    def __init__(self, model: dict, state_size: int, arrays: dict[str, np.ndarray]):
        """`model`: the manifest's ModelConfig fields; `state_size`: the summed STATE_KEYS sizes."""
        w = Weights(arrays)
        width, self.chunk, self.action_size = model["width"], model["chunk"], model["action_size"]
        if model["encoder"] == "state":
            self.encoder = StateEncoder(w, model, state_size)
        elif model["encoder"] == "transformer":
            self.encoder = TransformerEncoder(w, model, state_size)
        else:
            raise PolicyFileError(f"unknown encoder {model['encoder']!r} in the model spec")
        self.indicator = None
        if model["advantage_conditioned"]:
            self.indicator = w.array("indicator/embedding", (INDICATOR_VALUES, width))
        self.trunk = w.mlp("trunk", width, (width,) * model["depth"])
        self.head = w.linear("head", width, 2 * self.chunk * self.action_size)
        low, high = model["log_std_range"]
        # low + (tanh + 1) (high - low) / 2, as (low + high) / 2 + tanh (high - low) / 2: one op fewer.
        self.log_std_middle, self.log_std_half_span = F32(0.5 * (low + high)), F32(0.5 * (high - low))
        w.check_all_used()

    def __call__(self, obs: dict, indicator: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        x = self.encoder(obs)
        if self.indicator is not None:
            x = x + self.indicator[np.zeros(x.shape[:-1], np.intp) if indicator is None else indicator]
        out = self.head(self.trunk(x)).reshape(*x.shape[:-1], 2, self.chunk, self.action_size)
        log_std = np.tanh(out[..., 1, :, :])
        log_std *= self.log_std_half_span
        log_std += self.log_std_middle
        return out[..., 0, :, :], log_std


class Weights:
    """Named arrays, handed out once each with their shapes checked; see `check_all_used`."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self._arrays = arrays
        self._used: set[str] = set()

    def array(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in self._arrays:
            raise PolicyFileError(f"the model spec needs array {name!r}, which the file lacks")
        a = self._arrays[name]
        if a.shape != tuple(shape) or a.dtype != F32:
            raise PolicyFileError(
                f"array {name!r} is {a.dtype}{list(a.shape)}; the spec needs float32{list(shape)}"
            )
        self._used.add(name)
        # An aligned, writable copy: frombuffer views of the file's bytes may be misaligned for BLAS.
        return np.array(a, F32, order="C")

    def linear(self, prefix: str, fan_in: int, fan_out: int) -> Linear:
        kernel = self.array(f"{prefix}/kernel", (fan_in, fan_out))
        return Linear(kernel, self.array(f"{prefix}/bias", (fan_out,)))

    def norm(self, prefix: str, size: int) -> LayerNorm:
        return LayerNorm(self.array(f"{prefix}/scale", (size,)), self.array(f"{prefix}/bias", (size,)))

    def mlp(self, prefix: str, fan_in: int, widths: tuple[int, ...]) -> MLP:
        sizes = (fan_in, *widths)
        return MLP(
            [
                (self.linear(f"{prefix}/linears/{i}", a, b), self.norm(f"{prefix}/norms/{i}", b))
                for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True))
            ]
        )

    def check_all_used(self) -> None:
        unused = sorted(set(self._arrays) - self._used)
        if unused:
            raise PolicyFileError(f"the file has arrays its model spec does not use: {unused[:5]}")
