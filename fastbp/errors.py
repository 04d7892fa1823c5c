"""Exceptions fastbp raises besides ValueError/TypeError for bad arguments."""

from __future__ import annotations


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name but cannot run here.

    Carries ``backend``, ``reason`` (why not) and ``fix`` (what to do about it).
    """

    def __init__(self, backend: str, reason: str, fix: str) -> None:
        self.backend, self.reason, self.fix = backend, reason, fix
        super().__init__(f"backend {backend!r} is unavailable: {reason}. To fix: {fix}")


class TrainingDivergedError(FloatingPointError):
    """The training loss became NaN or Inf; the model keeps its last finite parameters."""

    def __init__(self, message: str, history=None) -> None:
        super().__init__(message)
        self.history = history
