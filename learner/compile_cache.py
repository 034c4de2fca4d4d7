"""JAX's persistent compilation cache, set up one way by every entry point and by the tests.

An MJX program takes tens of seconds to compile on a CPU; with the cache a rerun loads it instead. jax
writes a program to the cache when its compile took at least `jax_persistent_cache_min_compile_time_secs`
(1 s by default), so the many tiny jits do not fill the folder.
"""

import collections
import os

import jax

from configs import COMPILE_CACHE


def enable(directory: str | os.PathLike = COMPILE_CACHE) -> None:
    """Read compiled programs from `directory` and write new ones there (relative to the working folder)."""
    jax.config.update("jax_compilation_cache_dir", os.fspath(directory))


# The phases jax times while turning a traced function into an executable. The backend phase includes a
# load from the persistent cache, so a warm rerun shows what loading costs instead of compiling.
COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)


class CompileClock:
    """Seconds this process has spent tracing, lowering and compiling (or loading compiled) programs, summed
    from jax's monitoring events since the clock was made; `seconds` is read at any time, and `programs`
    counts the programs compiled or loaded by name ("jit(run)"). As a context manager it stops listening on
    exit."""

    def __init__(self):
        self.seconds = 0.0
        self.programs: collections.Counter[str] = collections.Counter()
        jax.monitoring.register_event_duration_secs_listener(self._record)

    def _record(self, event: str, duration_s: float, fun_name: str = "", **_) -> None:
        if event in COMPILE_EVENTS:
            self.seconds += duration_s
        if event == COMPILE_EVENTS[-1]:
            self.programs[fun_name] += 1

    def close(self) -> None:
        jax.monitoring.unregister_event_duration_listener(self._record)

    def __enter__(self) -> "CompileClock":
        return self

    def __exit__(self, *_) -> None:
        self.close()
