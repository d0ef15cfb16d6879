"""Errors that end a run with a one-line message and a documented exit code."""

from __future__ import annotations


class OnnxPruneError(Exception):
    """Base class: `str(error)` is the one-line message shown to the user."""

    exit_code = 1


class UsageError(OnnxPruneError):
    """Bad arguments: a ratio out of range, an unknown method, a malformed pattern."""

    exit_code = 2


class InputError(OnnxPruneError):
    """The model, plan, data or gradients file is missing, corrupt or not what it claims."""

    exit_code = 3


class OutputError(OnnxPruneError):
    """An output cannot be written: unwritable, or it would overwrite the input."""

    exit_code = 4


class UnsupportedModelError(OnnxPruneError):
    """The model is valid ONNX but declined as a whole (quantized graphs), or a plan does not fit it."""

    exit_code = 5


class VerificationError(OnnxPruneError):
    """The pruned model does not compute what the masked original computes; nothing is written."""

    exit_code = 6
