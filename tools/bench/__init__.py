"""`jaxvla bench`: what the simulator, the robot client and the learner cost, as ratios against their peers.

One module per section, each with its measurement and its table:
- `sim`: our MJX workcell against raw `vmap(mjx.step)` on the same models, and the C twin;
- `client`: the numpy client's batch-1 latency against the jitted JAX forward pass and the memory bound;
- `pretrain`: behaviour-cloning updates per second, FLOPs and MFU;
- `sac`: SAC train steps per second, fused on our replay or flashbax's, unfused, and PyTorch eager
  (`torch_workers` runs `torch_peer`, the PyTorch reference, in its own processes; `flashbax_peer` adapts
  flashbax's buffers; `blocks` makes the random rollout blocks both replays hold);
- `replay`: replay add and sample against flashbax;
- `updates`: PRO and Recap updates; `fleet`: ingestion, params publish/pull, control-loop jitter.
`measure` holds the timing protocol they share (docs/speed.md), `ratios` and `report` what the `--all`
report adds, `cli` the command line (`jaxvla bench`, or `python -m tools.bench`).
"""

import os

# The numpy client is timed as robots should run it, with one BLAS thread (see jaxvla.actor). This must be
# set before numpy loads, and a package runs this file before any of its modules. The other sections do
# not use numpy's BLAS.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
