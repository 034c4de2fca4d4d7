"""The PyTorch peer's side in the bench process: its spec from our configs, and the worker processes that
run `tools.bench.torch_peer` and serve timed repetitions on request."""

import importlib.util
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from jaxvla import models
from jaxvla import tokenizer
from jaxvla.models import config as model_config
from jaxvla.models import encoders
from learner import replay
from tools.bench.measure import PEER_MISSING
from tools.bench.measure import watchdog


def torch_spec(
    model: models.ModelConfig,
    config,
    counts: dict[str, int],
    capacities: dict[str, int],
    steps: int,
    reps: int,
) -> dict:
    """Sizes and hyperparameters for `tools.bench.torch_peer`, from the configs the JAX side runs."""
    if model.encoder != "state" or model.image or model.advantage_conditioned:
        raise ValueError("the PyTorch reference mirrors the state encoder without image or indicator only")
    return {
        "state_sizes": {k: model_config.STATE_SHAPES[k][0] for k in encoders.STATE_KEYS},
        "prompt_length": tokenizer.PROMPT_LENGTH,
        "vocabulary": len(tokenizer.VOCABULARY),
        "pad": tokenizer.PAD,
        "width": model.width,
        "depth": model.depth,
        "prompt_dim": model.prompt_dim,
        "chunk": model.chunk,
        "action_size": model.action_size,
        "ensemble": model.ensemble,
        "log_std_range": list(model.log_std_range),
        "counts": list(counts.values()),
        "capacities": list(capacities.values()),
        "utd": config.utd,
        "gamma": config.gamma,
        "tau": config.tau,
        "init_alpha": config.init_alpha,
        "actor_lr": config.actor_lr,
        "critic_lr": config.critic_lr,
        "alpha_lr": config.alpha_lr,
        "target_entropy": config.target_entropy_per_dim * model.chunk * model.action_size,
        "bc_weight": config.bc_weight,
        "bc_sources": [replay.SOURCES.index(s) for s in config.bc_sources],
        "nll_weight": config.nll_weight,
        "steps": steps,
        "reps": reps,
        "seed": 0,
    }


def torch_threads() -> list[int]:
    """Thread counts the PyTorch reference runs with: the machine's cores, and one.

    One as well because eager PyTorch's OpenMP pool slows down when another process holds a core: the
    reference is the faster of the two, and the ratio at the machine's cores (as many threads as XLA's pool)
    is reported beside it.
    """
    return sorted({os.cpu_count() or 1, 1}, reverse=True)


class TorchWorker:
    """`tools.bench.torch_peer` serving timed repetitions in its own process (torch's pool never competes with
    XLA's: each side waits while the other runs), so its repetitions interleave with the JAX ones."""

    def __init__(self, spec: dict, threads: int, limit: float):
        self.threads, self.limit, self.utd, self.times = threads, limit, spec["utd"], []
        command = [
            sys.executable,
            "-m",
            "tools.bench.torch_peer",
            "--serve",
            "--spec",
            json.dumps({**spec, "threads": threads}),
        ]
        # OpenMP threads that sleep at a barrier instead of spinning: spinning, 2 threads on this shared
        # 2-core machine ran 8x slower than sleeping (0.5 against 4.1 train steps/s, load 8), which made the
        # peer look slower than it is. stderr is inherited: a pipe nobody reads could fill and block.
        env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
        self.process = subprocess.Popen(
            command,
            cwd=Path(__file__).resolve().parents[2],  # the repository root
            text=True,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        with watchdog(f"learner: pytorch {threads} threads warm-up", limit):
            self.info = json.loads(self._line())

    def _line(self) -> str:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(
                f"tools.bench.torch_peer exited with {self.process.wait()} (its stderr is above)"
            )
        return line

    def repetition(self) -> float:
        """Seconds of one repetition of `steps` train steps, timed inside the worker."""
        with watchdog(f"learner: pytorch {self.threads} threads repetition", self.limit):
            self.process.stdin.write("\n")
            self.process.stdin.flush()
            return float(self._line())

    def close(self) -> dict:
        """The run's figures from the repetitions timed so far (the first one, a warm-up, left out)."""
        self.process.stdin.close()
        self.process.wait(timeout=self.limit)
        seconds = statistics.median(self.times)
        steps = self.info["steps_per_call"]
        return {
            **self.info,
            "train_steps_per_s": steps / seconds,
            "call_s": self.times,
            "critic_updates_per_s": steps * self.utd / seconds,
        }


def start_torch(spec: dict, limit: float) -> list[TorchWorker]:
    """One serving worker per thread count of `torch_threads`; none when torch is not installed."""
    if importlib.util.find_spec("torch") is None:
        return []
    return [TorchWorker(spec, threads, limit) for threads in torch_threads()]


def torch_result(workers: list[TorchWorker]) -> dict:
    """The fastest thread count's figures, every run under "runs", or a status saying torch is missing."""
    if not workers:
        return {"status": PEER_MISSING}
    runs = [worker.close() for worker in workers]
    best = max(runs, key=lambda run: run["train_steps_per_s"])
    same = next(run for run in runs if run["threads"] == max(torch_threads()))
    return {"status": "measured", **best, "runs": runs, "same_threads": same}
