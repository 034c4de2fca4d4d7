"""JAX's persistent compilation cache, set up one way by every entry point and by the tests.

An MJX program takes tens of seconds to compile on a CPU; with the cache a rerun loads it instead. jax
writes a program to the cache when its compile took at least `jax_persistent_cache_min_compile_time_secs`
(1 s by default), so the many tiny jits do not fill the folder.
"""

import os

import jax

from configs import COMPILE_CACHE


def enable(directory: str | os.PathLike = COMPILE_CACHE) -> None:
    """Read compiled programs from `directory` and write new ones there (relative to the working folder)."""
    jax.config.update("jax_compilation_cache_dir", os.fspath(directory))
