"""The numpy forward pass of `jaxvla.models.heads.Policy`, rebuilt from an export's model spec and arrays.

Each class mirrors one flax/jax op the models use, computing in float32 throughout: `nnx.Linear`
(x @ kernel + bias), `nnx.LayerNorm` (flax's fast variance E[x^2] - E[x]^2, clipped at 0, eps 1e-6),
SiLU, `nnx.Embed`, `nnx.Conv` (VALID, stride 2, NHWC, kernel HWIO) and `jax.nn.dot_product_attention`
(scale 1/sqrt(head_dim), masked keys at -0.7 * float32 max, softmax in float32). Where the arithmetic is
rearranged for speed (SiLU through tanh, halved LayerNorm parameters and the centring folded into the
weights in MLPs, the padding row zeroed instead of masked, only the readout token in the last transformer
block, the fuse kernel split by the inputs it meets; in `StatePass` biases as kernel rows and LayerNorm's
scaling as a 2-row product) it is the same maths, exact or to float32 rounding; `tests/test_actor.py`
checks the result against the jitted JAX forward pass for both encoders (within 1e-5 of the unit scale;
measured <= 4e-6).

Weights are looked up by their flat NNX path once, when the pass is built, and their shapes checked
against the spec, so a file that does not match its spec fails at load rather than mid-episode.
A spec with `dtype` "bfloat16" still runs here in float32 (it then agrees with JAX to bfloat16 rounding).

numpy, `jaxvla.schema`, `jaxvla.tokenizer` and the standard library only.
"""

import math
import threading

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


def matmul(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """x [..., in] @ kernel [in, out]. np.dot gives matmul's result with less dispatch for x of one or two
    axes; with more it does not call BLAS (20x slower for the transformer's [B, N, D] tokens)."""
    return np.dot(x, kernel) if x.ndim <= 2 else np.matmul(x, kernel)


class Linear:
    """nnx.Linear: [..., in] -> [..., out]."""

    def __init__(self, kernel: np.ndarray, bias: np.ndarray):
        self.kernel, self.bias = kernel, bias

    def __call__(self, x: np.ndarray) -> np.ndarray:
        y = matmul(x, self.kernel)
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
                    NormSiLU(norm),
                )
            )

    def __call__(self, x: np.ndarray) -> np.ndarray:
        for kernel, bias, activation in self.layers:
            z = matmul(x, kernel)
            z += bias
            x = activation(z)
        return x


class NormSiLU:
    """LayerNorm then SiLU of an `MLP` layer's centred pre-activation z [..., D], in place on z."""

    def __init__(self, norm: LayerNorm):
        self.half_scale, self.half_bias = norm.scale * F32(0.5), norm.bias * F32(0.5)
        self.inv_n = 1.0 / norm.scale.shape[0]

    def __call__(self, z: np.ndarray) -> np.ndarray:
        if z.ndim == 1:
            z *= F32(1.0 / math.sqrt(float(np.dot(z, z)) * self.inv_n + LAYER_NORM_EPS))
        else:
            var = np.add.reduce(z * z, axis=-1, keepdims=True)
            var *= F32(self.inv_n)
            var += F32(LAYER_NORM_EPS)
            z /= np.sqrt(var, out=var)
        z *= self.half_scale
        z += self.half_bias
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
    """encoders.StateEncoder: state MLP, bag-of-words prompt, optional depth CNN, fused by an MLP.

    The fuse layer's kernel is split by the rows each part meets (state, words, image): the prompt's
    share of its pre-activation (`prompt`) is then one vector, constant while the prompt is, and a
    caller that keeps it runs one matmul on the state part per observation.
    """

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
        [(kernel, self.fuse_bias, self.fuse_activation)] = w.mlp("encoder/fuse", fused, (width,)).layers
        self.fuse_state, self.fuse_words, self.fuse_image = (
            np.ascontiguousarray(k) for k in np.split(kernel, [width, width + prompt_dim])
        )

    def __call__(self, obs: dict) -> np.ndarray:
        """obs "state" [..., S], "prompt" [..., L] int, "image" [..., H, W, 4] if read -> [..., width]."""
        return self.encode(obs["state"], self.prompt(obs["prompt"]), obs.get("image"))

    def prompt(self, prompt: np.ndarray) -> np.ndarray:
        """Token ids [..., L] -> their share of the fuse layer's (centred) pre-activation [..., width]."""
        words = np.add.reduce(self.embed.take(prompt, axis=0), axis=-2)
        z = matmul(words[..., :-1] / np.maximum(words[..., -1:], F32(1.0)), self.fuse_words)
        z += self.fuse_bias
        return z

    def encode(self, state: np.ndarray, prompt: np.ndarray, image: np.ndarray | None = None) -> np.ndarray:
        """state [..., S], `prompt(ids)` [..., width], image [..., H, W, 4] if read -> [..., width]."""
        z = matmul(self.state(state), self.fuse_state)
        z += prompt
        if self.convs:
            x = image[..., 3:4]
            for conv in self.convs:
                x = silu(conv(x))
            z += matmul(np.add.reduce(x, axis=(-3, -2)) / F32(x.shape[-3] * x.shape[-2]), self.fuse_image)
        return self.fuse_activation(z)


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

    def prompt(self, prompt: np.ndarray) -> np.ndarray:
        """Token ids [..., L], as they are: the words are tokens that attend to the state and image."""
        return prompt

    def encode(self, state: np.ndarray, prompt: np.ndarray, image: np.ndarray | None = None) -> np.ndarray:
        """state [B, S], prompt ids [B, L], image [B, H, W, 4] if read -> readout [B, width]; or no [B]."""
        if prompt.ndim == 1:  # one example: the attention below is written for a batch
            return self.encode(state[None], prompt[None], None if image is None else image[None])[0]
        batch, width = prompt.shape[0], self.readout.shape[0]
        readout = np.broadcast_to(self.readout, (batch, 1, width))
        tokens = [readout, self.state(state)[:, None], self.words[prompt]]
        mask = [np.ones((batch, 2), bool), prompt_mask(prompt)]
        if self.patches is not None:
            patches = self.patches(patchify(image, self.patch))
            tokens.append(patches)
            mask.append(np.ones(patches.shape[:2], bool))
        x = np.concatenate(tokens, axis=1) + self.position
        key_mask = np.concatenate(mask, axis=1)[:, None, None, :]
        for i, block in enumerate(self.blocks):
            x = block(x, key_mask, readout_only=i == len(self.blocks) - 1)
        return self.norm(x[:, 0])


class StatePass:
    """A state-encoder policy's pass (no image, no indicator) for one observation, in few numpy calls.

    (state [S + 1], `StateEncoder.prompt(ids)` [width]) -> (mean, log_std, tanh(mean)) [H, A]; `state` is
    the normalised state with a constant 1 appended (`normalization.OneState` writes it so).
    Right after other work (a robot's control loop, the bench's JAX calls) a small numpy call costs 0.5-1
    us here and a 256-wide layer's matmul about 5, so this pass saves calls: seven a layer and an item
    assignment, where `MLP` makes nine.
    - Each layer's input ends in a constant 1 and its kernel in a bias row, so the matmul adds the bias.
      The fuse layer's bias row holds the prompt's vector (its words' share and the bias), written into
      this thread's copy of the kernel when the prompt changes.
    - LayerNorm's scaling is one 2-row matrix-vector product, [1/sqrt(var + eps), 1] @ [z half_scale;
      half_bias], where three elementwise calls would do; the variance is a Python float, as in `MLP`.
    It agrees with `PolicyForward`'s general path to float32 rounding. Its buffers are per thread.
    """

    def __init__(
        self, encoder: StateEncoder, trunk: MLP, head: Linear, log_std: tuple, shape: tuple[int, int]
    ):
        """`log_std`: (middle, half span) of its range; `shape`: (chunk, action_size)."""
        # (kernel [in + 1, out] with the bias as its last row, NormSiLU) per layer; the fuse layer's bias
        # row is a placeholder for the prompt's vector.
        fuse = (encoder.fuse_state, encoder.fuse_bias, encoder.fuse_activation)
        layers = [*encoder.state.layers, fuse, *trunk.layers]
        self.layers = [(_with_bias_row(kernel, bias), norm) for kernel, bias, norm in layers]
        self.fuse = len(encoder.state.layers)
        self.head = _with_bias_row(head.kernel, head.bias)
        self.middle, self.half_span = (np.array(v, F32) for v in log_std)
        self.shape = (2, *shape)
        self._local = threading.local()

    def __call__(self, state: np.ndarray, prompt: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """-> (mean, log_std, tanh(mean)) [H, A], new arrays (the buffers are reused).

        `prompt` is told apart by identity, not contents: pass the same read-only array while the prompt
        is the same (`Policy` keeps one per prompt).
        """
        x = state
        for kernel, half_scale, inv_n, z, coef, rows, h, t, out in self._layers(prompt):
            np.dot(x, kernel, out=z)
            coef[0] = 1.0 / math.sqrt(float(np.dot(z, z)) * inv_n + LAYER_NORM_EPS)
            np.multiply(z, half_scale, out=z)
            np.dot(coef, rows, out=h)  # z is rows[0]
            np.tanh(h, out=t)
            t *= h
            h += t  # h is out[:-1]: SiLU, and the next layer's input
            x = out
        return mean_and_log_std(np.dot(x, self.head).reshape(self.shape), self.middle, self.half_span)

    def _layers(self, prompt: np.ndarray) -> list[tuple]:
        """This thread's layers, `prompt` in the fuse kernel's bias row: (kernel, half_scale, 1 / width,
        then buffers z, coef [r, 1], rows [z; half_bias], h, t, out [h; 1])."""
        local = self._local
        if not hasattr(local, "layers"):
            local.layers = [self._buffers(*layer, own=i == self.fuse) for i, layer in enumerate(self.layers)]
            local.prompt = None
        if local.prompt is not prompt:
            local.layers[self.fuse][0][-1] = prompt
            local.prompt = prompt
        return local.layers

    @staticmethod
    def _buffers(kernel: np.ndarray, norm: NormSiLU, own: bool) -> tuple:
        """One layer's entry of `_layers`; `own`: the thread gets its own copy of the kernel."""
        rows = np.stack([np.zeros_like(norm.half_bias), norm.half_bias])
        out = np.ones(len(norm.half_bias) + 1, F32)
        kernel = kernel.copy() if own else kernel
        coef, t = np.ones(2, F32), np.empty_like(norm.half_bias)
        return kernel, norm.half_scale, norm.inv_n, rows[0], coef, rows, out[:-1], t, out


def mean_and_log_std(out: np.ndarray, middle, half_span) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The head's output [..., 2, H, A] -> (mean, log_std, tanh(mean)), log_std = middle + tanh * half span
    (`PolicyForward` says why); one tanh call serves both."""
    squashed = np.tanh(out)
    log_std = squashed[..., 1, :, :] * half_span
    log_std += middle
    return out[..., 0, :, :], log_std, squashed[..., 0, :, :]


def _with_bias_row(kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.concatenate([kernel, bias[None]]), F32)


# ---------------------------------------------------------------------------------------- policy
class PolicyForward:
    """(normalised state, `prompt(ids)`, normalised image or None, indicator or None) -> (mean, log_std,
    tanh(mean)).

    state [S] (the schema's STATE_KEYS vectors concatenated), prompt from ids [L] int, image [H, W, 4] if
    the model reads it, indicator []; outputs [H, A], float32. Or a batch: a leading [B] on all of them.
    `one`, where the model has it, is the faster pass for one observation (`StatePass`).
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
        # The fast pass for one observation, where the model has one (the default model does).
        self.one = None
        if isinstance(self.encoder, StateEncoder) and not self.encoder.convs and self.indicator is None:
            log_std = (self.log_std_middle, self.log_std_half_span)
            self.one = StatePass(self.encoder, self.trunk, self.head, log_std, (self.chunk, self.action_size))

    def prompt(self, prompt: np.ndarray) -> np.ndarray:
        """Token ids [..., L] -> what the encoder reads of them; constant while the prompt is, so a caller
        may keep it per prompt (`Policy` does, for one observation)."""
        return self.encoder.prompt(prompt)

    def __call__(
        self,
        state: np.ndarray,
        prompt: np.ndarray,
        image: np.ndarray | None = None,
        indicator: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """-> (mean, log_std, tanh(mean)) [..., H, A]."""
        x = self.encoder.encode(state, prompt, image)
        if self.indicator is not None:
            x = x + self.indicator[np.zeros(x.shape[:-1], np.intp) if indicator is None else indicator]
        out = self.head(self.trunk(x)).reshape(*x.shape[:-1], 2, self.chunk, self.action_size)
        return mean_and_log_std(out, self.log_std_middle, self.log_std_half_span)


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
