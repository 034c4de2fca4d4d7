"""JAX's persistent compilation cache, set up one way by every entry point and by the tests.

An MJX program takes tens of seconds to compile on a CPU; with the cache a rerun loads it instead. jax
writes a program to the cache when its compile took at least `jax_persistent_cache_min_compile_time_secs`
(1 s by default), so the many tiny jits do not fill the folder.
"""

import collections
import functools
import logging
import os
import re

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


class ProgramLog:
    """Counts the programs this process builds (compiles, or loads from the persistent cache) from now on,
    by name and cache key, read from the record jax writes for each (what `jax_log_compiles` prints). The
    key hashes the whole program, so a key seen twice is the same program built again rather than reused:
    a jitted function made anew for each seed or round, say. Needs the persistent cache (`enable`), which
    every entry point turns on."""

    def __init__(self):
        self.builds = build_records()
        self.before = collections.Counter(self.builds.counts)

    def built_again(self) -> dict[str, int]:
        """Program name -> builds since this log began of a program this process had already built."""
        again = collections.Counter()
        for key, n in self.builds.counts.items():
            new = n - self.before[key]
            if new:
                again[key[0]] += new if key in self.before else new - 1
        return {name: n for name, n in again.items() if n}


class BuildRecords(logging.Handler):
    """The process's one listener on jax's compiler log: counts every build by (name, cache key).

    jax logs each build at DEBUG level unless `jax_log_compiles` is on, so the compiler's logger is set to
    DEBUG and stops propagating; what would have been printed before is passed on to its parent as usual.
    """

    LOGGER = "jax._src.compiler"
    MESSAGE = re.compile(
        r"(?:Persistent compilation cache hit|PERSISTENT COMPILATION CACHE MISS) for '(.*)' with key '(.*)'"
    )

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()
        logger = logging.getLogger(self.LOGGER)
        self.passed_on, self.parent = logger.getEffectiveLevel(), logger.parent
        logger.setLevel(logging.DEBUG)
        logger.propagate = False
        logger.addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        match = self.MESSAGE.match(record.getMessage())
        if match:
            self.counts[match.groups()] += 1
        if record.levelno >= self.passed_on:
            self.parent.handle(record)


@functools.cache
def build_records() -> BuildRecords:
    return BuildRecords()
