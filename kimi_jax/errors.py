"""User-facing errors.

A `KimiError` carries one readable line that names what is wrong (file, tensor, field, parameter).
The CLIs print it as `error: <message>` and exit non-zero without a traceback; a server turns it
into a 4xx answer and stays up. Anything else that escapes is a bug and keeps its traceback.
"""


class KimiError(Exception):
    """Bad input from a user: a checkpoint, a config field, a flag, a prompt."""


class ConfigError(KimiError):
    """A config.json field is missing, of the wrong type, or inconsistent with another."""


class CheckpointError(KimiError):
    """A checkpoint file or tensor is missing, truncated, or of the wrong dtype/shape."""
