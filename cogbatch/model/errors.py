"""The base of cogbatch's error hierarchy, in the model package because that package is the leaf.

Every package may import `cogbatch.model`, never the reverse, so the classes the model raises itself
(a config.json that describes no CogVLM, a checkpoint that cannot be used, a damaged cache entry) and
the base they share with the pipeline's errors live here; `cogbatch.errors` extends them. Each class
carries the exit code a process that ends with it exits with, so the mapping is by class, in one place.
Torch-free: `cogbatch --help` and the job reader import it.
"""

from __future__ import annotations


class CogbatchError(Exception):
    """Any error cogbatch raises on purpose. Without a more precise class, a run that ends with it aborted: 1."""

    exit_code = 1


class UserError(CogbatchError):
    """Something the user must fix (a job file, a model source, a memory ceiling): exit 2, nothing was done."""

    exit_code = 2


class ConfigError(UserError, ValueError):
    """A configuration problem (a job or pipeline file, an override, a checkpoint's config.json).

    The message starts with the key path (`tasks[1].max_new_tokens: ...`) or names the file. A ValueError
    too: the model API (`CogVLMConfig.from_dict`, `QuantConfig.parse`) is called with plain values.
    """


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used (missing, pickled, mismatched shapes), with a message for the user."""


class CacheError(CogbatchError):
    """A quantized-weights cache entry that must not be used (stale, incomplete, damaged, edited, unreadable).

    Never reaches the user: the loader quantizes the checkpoint again instead.
    """
