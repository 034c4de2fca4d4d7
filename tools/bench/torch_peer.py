"""The PyTorch reference for `tools.bench --learner`: the same SAC update over action chunks, plain eager.

Same networks (LayerNorm MLP state encoder with a bag-of-words prompt embedding, tanh-Gaussian chunk
policy, a critic ensemble with its own encoder evaluated batched with `torch.baddbmm`) and the same update
as `learner.sac.update`: `utd` critic updates (TD target from the min over the target ensemble at a chunk
drawn from the policy, squared error, target EMA), then one actor update (alpha log pi - mean Q plus
behaviour cloning on the BC source) and one temperature update, all with Adam and the same gradient
clipping. Batches come the natural PyTorch way: `torch.randint` indices into tensors holding pre-made
n-step transitions, one store per source, mixed by the same counts.

`tools.bench` runs this module in its own process, `python -m tools.bench.torch_peer --spec JSON`, so torch's
thread pool never competes with XLA's; the sizes and hyperparameters come in the spec (built from
`configs` by the bench), and the result is one JSON line on stdout. With `--serve` the process builds the
learner, warms up, prints one JSON line and then times one repetition per line read from stdin, answering
each with its seconds: the bench interleaves these repetitions with its JAX ones. torch is an optional install
(tools/bench-requirements.txt), never a dependency of the project.
"""

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

LAYER_NORM_EPS = 1e-6  # as jaxvla.models.layers
NORM_CLIP = 10.0  # as jaxvla.normalization.CLIP
CLIP_NORM = 10.0  # as learner.sac.make_optimizer
ACTION_CLIP = 1.0 - 1e-3  # as jaxvla.models.distributions
WARMUP_STEPS = 3  # untimed train steps first (allocator and thread-pool start)


# ------------------------------------------------------------------------------------------- networks
class MLP(nn.Module):
    """[..., sizes[0]] -> [..., sizes[-1]]: (Linear -> LayerNorm -> SiLU) per layer."""

    def __init__(self, sizes: list[int]):
        super().__init__()
        layers = []
        for a, b in zip(sizes[:-1], sizes[1:], strict=True):
            layers += [nn.Linear(a, b), nn.LayerNorm(b, eps=LAYER_NORM_EPS), nn.SiLU()]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class StateEncoder(nn.Module):
    """obs -> [B, width]: an MLP over the float features, the mean embedding of the prompt's words, fused."""

    def __init__(self, spec: dict):
        super().__init__()
        width, prompt_dim = spec["width"], spec["prompt_dim"]
        self.keys = list(spec["state_sizes"])
        self.pad = spec["pad"]
        self.state = MLP([sum(spec["state_sizes"].values()), width, width])
        self.embed = nn.Embedding(spec["vocabulary"], prompt_dim)
        self.fuse = MLP([width + prompt_dim, width])

    def forward(self, obs: dict) -> torch.Tensor:
        state = self.state(torch.cat([obs[k] for k in self.keys], dim=-1))
        mask = (obs["prompt"] != self.pad).unsqueeze(-1).float()
        words = (self.embed(obs["prompt"]) * mask).sum(-2) / mask.sum(-2).clamp_min(1.0)
        return self.fuse(torch.cat([state, words], dim=-1))


class Policy(nn.Module):
    """obs -> (mean, log_std) [B, H, A] of a tanh-Gaussian over the chunk."""

    def __init__(self, spec: dict):
        super().__init__()
        width, self.chunk, self.action = spec["width"], spec["chunk"], spec["action_size"]
        self.log_std_min, self.log_std_max = spec["log_std_range"]
        self.encoder = StateEncoder(spec)
        self.trunk = MLP([width] * (spec["depth"] + 1))
        self.head = nn.Linear(width, 2 * self.chunk * self.action)

    def forward(self, obs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.head(self.trunk(self.encoder(obs))).view(-1, 2, self.chunk, self.action)
        span = self.log_std_max - self.log_std_min
        return out[:, 0], self.log_std_min + 0.5 * span * (torch.tanh(out[:, 1]) + 1.0)


class EnsembleLinear(nn.Module):
    """E linear maps in one batched matmul: [B, in] or [E, B, in] -> [E, B, out]."""

    def __init__(self, ensemble: int, in_features: int, out_features: int):
        super().__init__()
        bound = 1.0 / math.sqrt(in_features)
        self.weight = nn.Parameter(torch.empty(ensemble, in_features, out_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.zeros(ensemble, 1, out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x.expand(self.weight.shape[0], *x.shape)
        return torch.baddbmm(self.bias, x, self.weight)


class Critic(nn.Module):
    """(obs, chunk [B, H, A]) -> Q [E, B]; one LayerNorm per depth shared by the members, as in JAX."""

    def __init__(self, spec: dict):
        super().__init__()
        width, ensemble = spec["width"], spec["ensemble"]
        self.encoder = StateEncoder(spec)
        sizes = [width + spec["chunk"] * spec["action_size"]] + [width] * spec["depth"]
        self.linears = nn.ModuleList(
            EnsembleLinear(ensemble, a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True)
        )
        self.norms = nn.ModuleList(nn.LayerNorm(width, eps=LAYER_NORM_EPS) for _ in sizes[1:])
        self.out = EnsembleLinear(ensemble, width, 1)

    def forward(self, obs: dict, chunk: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.encoder(obs), chunk.flatten(1)], dim=-1)
        for linear, norm in zip(self.linears, self.norms, strict=True):
            x = F.silu(norm(linear(x)))
        return self.out(x).squeeze(-1)


# --------------------------------------------------------------------------------------- distribution
def squash_log_det(u: torch.Tensor) -> torch.Tensor:
    """log(1 - tanh(u)^2), written stably."""
    return 2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u))


def gaussian_log_prob(u: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    z = (u - mean) * torch.exp(-log_std)
    return -0.5 * z**2 - log_std - 0.5 * math.log(2.0 * math.pi)


def sample(mean: torch.Tensor, log_std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A reparameterised chunk [B, H, A] and its log-probability [B]."""
    u = mean + torch.exp(log_std) * torch.randn_like(mean)
    log_prob = gaussian_log_prob(u, mean, log_std) - squash_log_det(u)
    return torch.tanh(u), log_prob.sum(dim=(-2, -1))


def chunk_loss(mean, log_std, chunk, mask, nll_weight: float) -> torch.Tensor:
    """Masked squared error of tanh(mean) plus `nll_weight` times the chunk's negative log-likelihood."""
    mask = mask.float().unsqueeze(-1)
    count = (mask.sum() * mean.shape[-1]).clamp_min(1.0)
    mse = (mask * (torch.tanh(mean) - chunk) ** 2).sum() / count
    u = torch.atanh(chunk.clamp(-ACTION_CLIP, ACTION_CLIP))
    nll = -(mask * (gaussian_log_prob(u, mean, log_std) - squash_log_det(u))).sum() / count
    return mse + nll_weight * nll


def weighted_mean(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return (x * weight).sum(-1) / weight.sum().clamp_min(1.0)


# ---------------------------------------------------------------------------------------------- replay
class TensorReplay:
    """Pre-made n-step transitions of one source in tensors [N, ...]; sampled with `torch.randint`."""

    def __init__(self, spec: dict, capacity: int, source: int, generator: torch.Generator):
        chunk, action, length = spec["chunk"], spec["action_size"], spec["prompt_length"]

        def obs():
            fields = {
                k: torch.randn(capacity, size, generator=generator) for k, size in spec["state_sizes"].items()
            }
            words = torch.randint(2, spec["vocabulary"], (capacity, length), generator=generator)
            lengths = torch.randint(1, length + 1, (capacity, 1), generator=generator)
            fields["prompt"] = torch.where(torch.arange(length) < lengths, words, spec["pad"])
            return fields

        # About one episode end per 100 steps: the chunk is cut there and the target does not bootstrap.
        ends = torch.randint(0, 100 * chunk, (capacity,), generator=generator)
        self.data = {
            "obs": obs(),
            "next_obs": obs(),
            "chunk": torch.rand(capacity, chunk, action, generator=generator) * 2.0 - 1.0,
            "chunk_mask": torch.arange(chunk) <= ends.unsqueeze(-1),
            "reward": torch.randn(capacity, generator=generator),
            "discount": torch.where(ends < chunk, 0.0, spec["gamma"] ** chunk),
            "source": torch.full((capacity,), source),
        }
        self.capacity = capacity

    def sample(self, count: int) -> dict:
        index = torch.randint(self.capacity, (count,))
        return {
            k: {n: x[index] for n, x in v.items()} if isinstance(v, dict) else v[index]
            for k, v in self.data.items()
        }


def normalize(obs: dict, stats: dict) -> dict:
    return {
        k: ((v - stats[k][0]) / stats[k][1]).clamp(-NORM_CLIP, NORM_CLIP) if k in stats else v
        for k, v in obs.items()
    }


# ---------------------------------------------------------------------------------------------- update
class Learner:
    """Networks, optimisers and the update of one train step."""

    def __init__(self, spec: dict, replays: list[TensorReplay], counts: list[int]):
        self.spec, self.replays, self.counts = spec, replays, counts
        self.actor, self.critic = Policy(spec), Critic(spec)
        self.target = copy.deepcopy(self.critic).requires_grad_(False)
        self.log_alpha = torch.tensor(math.log(spec["init_alpha"]), requires_grad=True)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=spec["actor_lr"])
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=spec["critic_lr"])
        self.alpha_opt = torch.optim.Adam([self.log_alpha], lr=spec["alpha_lr"])
        self.stats = {k: (torch.zeros(size), torch.ones(size)) for k, size in spec["state_sizes"].items()}
        self.bc_sources = torch.tensor(spec["bc_sources"])

    def batch(self) -> dict:
        """One mixed batch: each source's share drawn from its store, concatenated, obs normalised."""
        parts = [replay.sample(count) for replay, count in zip(self.replays, self.counts, strict=True)]
        batch = {k: torch.cat([p[k] for p in parts]) for k in parts[0] if k not in ("obs", "next_obs")}
        for key in ("obs", "next_obs"):
            batch[key] = normalize(
                {n: torch.cat([p[key][n] for p in parts]) for n in parts[0][key]}, self.stats
            )
        batch["weight"] = torch.ones(batch["reward"].shape[0])
        return batch

    def critic_update(self, batch: dict) -> None:
        with torch.no_grad():
            next_chunk, _ = sample(*self.actor(batch["next_obs"]))
            next_q = self.target(batch["next_obs"], next_chunk).min(dim=0).values
            target = batch["reward"] + batch["discount"] * next_q
        q = self.critic(batch["obs"], batch["chunk"])
        loss = weighted_mean((q - target) ** 2, batch["weight"]).mean()
        self.critic_opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.critic.parameters(), CLIP_NORM)
        self.critic_opt.step()
        with torch.no_grad():
            for target_param, param in zip(self.target.parameters(), self.critic.parameters(), strict=True):
                target_param.lerp_(param, self.spec["tau"])

    def actor_update(self, batch: dict) -> None:
        spec = self.spec
        alpha = self.log_alpha.exp().detach()
        is_bc = torch.isin(batch["source"], self.bc_sources) & (batch["weight"] > 0)
        bc_mask = batch["chunk_mask"] & is_bc.unsqueeze(-1)
        # The critic is a constant here: no gradients for its parameters (Spinning Up's SAC does the same).
        self.critic.requires_grad_(False)
        mean, log_std = self.actor(batch["obs"])
        chunk, log_prob = sample(mean, log_std)
        q = self.critic(batch["obs"], chunk)
        rl = weighted_mean(alpha * log_prob - q.mean(dim=0), batch["weight"])
        loss = rl + spec["bc_weight"] * chunk_loss(mean, log_std, batch["chunk"], bc_mask, spec["nll_weight"])
        self.actor_opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.actor.parameters(), CLIP_NORM)
        self.actor_opt.step()
        self.critic.requires_grad_(True)

        entropy_gap = weighted_mean(log_prob.detach() + spec["target_entropy"], batch["weight"])
        alpha_loss = -self.log_alpha.exp() * entropy_gap
        self.alpha_opt.zero_grad(set_to_none=True)
        alpha_loss.backward()
        self.alpha_opt.step()

    def train_step(self) -> None:
        """`utd` critic updates, then one actor and temperature update, each on its own fresh batch."""
        for _ in range(self.spec["utd"]):
            self.critic_update(self.batch())
        self.actor_update(self.batch())


# ------------------------------------------------------------------------------------------------ main
def warmed_up(spec: dict) -> tuple[Learner, dict]:
    """The learner after WARMUP_STEPS untimed train steps, and what describes the run."""
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    generator = torch.Generator().manual_seed(spec["seed"])
    replays = [
        TensorReplay(spec, capacity, source, generator) for source, capacity in enumerate(spec["capacities"])
    ]
    learner = Learner(spec, replays, spec["counts"])
    t0 = time.perf_counter()  # eager torch's analogue of a compile: first-call allocations and dispatch
    for _ in range(WARMUP_STEPS):
        learner.train_step()
    warmup_s = time.perf_counter() - t0
    params = sum(p.numel() for p in (*learner.actor.parameters(), *learner.critic.parameters()))
    return learner, {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "params": params,
        "steps_per_call": spec["steps"],
        "warmup_steps": WARMUP_STEPS,
        "warmup_s": warmup_s,
    }


def timed_repetition(learner: Learner, steps: int) -> float:
    """Seconds for `steps` train steps."""
    t0 = time.perf_counter()
    for _ in range(steps):
        learner.train_step()
    return time.perf_counter() - t0


def run(spec: dict) -> dict:
    """Train steps per second: `steps` per repetition after WARMUP_STEPS untimed ones, median of `reps`."""
    learner, info = warmed_up(spec)
    times = [timed_repetition(learner, spec["steps"]) for _ in range(spec["reps"])]
    return {**info, **rates(times, spec)}


def rates(times: list[float], spec: dict) -> dict:
    seconds = statistics.median(times)
    return {
        "train_steps_per_s": spec["steps"] / seconds,
        "critic_updates_per_s": spec["steps"] * spec["utd"] / seconds,
        "call_s": times,
    }


def serve(spec: dict) -> None:
    """One timed repetition per stdin line, its seconds as one JSON line each; the run's info first."""
    learner, info = warmed_up(spec)
    print(json.dumps(info), flush=True)
    for _ in sys.stdin:
        print(json.dumps(timed_repetition(learner, spec["steps"])), flush=True)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench.torch_peer", description=__doc__.splitlines()[0])
    p.add_argument("--spec", required=True, help="JSON sizes and hyperparameters (tools.bench builds it)")
    p.add_argument("--serve", action="store_true", help="time one repetition per line read from stdin")
    args = p.parse_args(argv)
    spec = json.loads(args.spec)
    spec.setdefault("threads", os.cpu_count() or 1)
    if args.serve:
        serve(spec)
    else:
        print(json.dumps(run(spec)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
