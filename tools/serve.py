"""`jaxvla serve [config] [--fleet.field value ...]`: the fleet service, and the learner behind it.

Serves the protocol of `learner/fleet/service.py` on `fleet.host:fleet.port` over `<fleet.root>/store` (the
episode store) and `<fleet.root>/params` (the params registry). Unless `--fleet.no-learner`, it also
starts the learner (`tools/fleet_learner.py`) as a child process and restarts it with backoff whenever
it dies: the service never waits on the learner, so a learner crash never stalls a robot. The robots'
tokens are in `fleet.tokens` (created with `fleet.robots` random tokens when missing).
"""

import json
import os
import pathlib
import secrets
import subprocess
import sys
import threading

from etils import epath

import configs
from learner.fleet.service import Service
from learner.fleet.service import load_tokens
from learner.fleet.service import serve
from learner.fleet.store import EpisodeStore
from learner.fleet.store import ParamsRegistry
from learner.fleet.store import is_local

PROG = "jaxvla serve"
# What the service and its learner read (the learner gets the same arguments): the learner patches
# `target.prior` on `target.task` with `sac.*` and `patch.capacity`, `patch.updates_per_round` and
# `patch.offline_episodes`, and gates on `target.split`.
SECTIONS = ("target", "fleet", "sac", "patch")


def tokens_file(fleet: configs.FleetConfig) -> pathlib.Path:
    """The tokens file, created (readable by its owner only) with one random token per robot if absent."""
    if not fleet.tokens and not is_local(epath.Path(fleet.root)):
        raise SystemExit(
            f"{PROG}: fleet.root {fleet.root} is not local; give the tokens file with --fleet.tokens"
        )
    path = pathlib.Path(fleet.tokens) if fleet.tokens else pathlib.Path(fleet.root) / "tokens.json"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tokens = {f"robot-{i}": secrets.token_urlsafe(24) for i in range(fleet.robots)}
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(tokens, f, indent=1)
        print(f"{PROG}: wrote {fleet.robots} robot tokens to {path}")
    return path


class Supervisor(threading.Thread):
    """Runs a command and restarts it with exponential backoff whenever it dies, until `stop`."""

    def __init__(self, command: list[str], log: pathlib.Path, max_delay: float = 30.0):
        super().__init__(name="learner-supervisor", daemon=True)
        self.command, self.log, self.max_delay = command, log, max_delay
        self.stopping = threading.Event()
        self.process: subprocess.Popen | None = None
        self.restarts = 0

    def run(self) -> None:
        delay = 1.0
        self.log.parent.mkdir(parents=True, exist_ok=True)
        while not self.stopping.is_set():
            with self.log.open("a") as out:
                self.process = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT)
                code = self.process.wait()
            if code == 0 or self.stopping.is_set():
                return  # finished its rounds, or we are shutting down
            self.restarts += 1
            print(f"{PROG}: learner exited with {code}; restart {self.restarts} in {delay:.0f} s", flush=True)
            self.stopping.wait(delay)
            delay = min(2 * delay, self.max_delay)

    def stop(self) -> None:
        self.stopping.set()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()


def main(argv: list[str]) -> int:
    config = configs.cli(argv, PROG, sections=SECTIONS)
    fc = config.fleet
    root = epath.Path(fc.root)
    service = Service(
        EpisodeStore(root / "store"),
        ParamsRegistry(root / "params"),
        load_tokens(tokens_file(fc)),
        max_body_bytes=fc.max_body_mb << 20,
        max_episodes=fc.max_episodes_per_push,
        max_steps=fc.max_steps,
        compact_every=fc.compact_every,
        part_episodes=fc.part_episodes,
        max_infer_batch=fc.max_infer_batch,
    )
    supervisor = None
    if fc.learner:
        command = [sys.executable, "-m", "tools.fleet_learner", *argv]
        supervisor = Supervisor(command, pathlib.Path(fc.root) / "learner" / "stdout.log")
        supervisor.start()
    print(f"{PROG}: http://{fc.host}:{fc.port}  store {root / 'store'}  params {root / 'params'}", flush=True)
    if fc.page_port:
        print(f"{PROG}: fleet page http://{fc.page_host}:{fc.page_port}/", flush=True)
    try:
        serve(service, fc.host, fc.port, fc.page_host, fc.page_port)
    finally:
        if supervisor is not None:
            supervisor.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
