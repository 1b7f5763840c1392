"""Enumerations of the handler: the kind of model and where logs go."""

from __future__ import annotations

from enum import Enum

__all__ = ["LoggingMode", "ModelType"]


class ModelType(Enum):
    """The task a model solves; decides how batches are split and the default loss.

    Example:
        >>> ModelType.from_string("score-based") is ModelType.SCORE_BASED
        True
    """

    CLASSIFICATION = "classification"
    GENERATIVE = "generative"
    REGRESSION = "regression"
    SCORE_BASED = "score_based"

    @classmethod
    def from_string(cls, s: str) -> ModelType:
        """Parse a name or value, case-insensitive; ``-`` and spaces count as ``_``."""
        if isinstance(s, cls):
            return s
        if not isinstance(s, str):
            raise TypeError(f"model_type must be a ModelType or a string, got {type(s).__name__}")
        key = s.strip().lower().replace("-", "_").replace(" ", "_")
        for member in cls:
            if key in (member.value, member.name.lower()):
                return member
        allowed = ", ".join(repr(m.value) for m in cls)
        raise ValueError(f"unknown model type {s!r}; use one of {allowed} (or NNHandler.ModelType)")

    @property
    def inputs_are_targets(self) -> bool:
        """Generative and score-based models learn the input itself."""
        return self in (ModelType.GENERATIVE, ModelType.SCORE_BASED)


class LoggingMode(Enum):
    """Where the handler's log records go (rank 0 only).

    Example:
        >>> LoggingMode("both") is LoggingMode.BOTH
        True
    """

    CONSOLE = "console"
    FILE = "file"
    BOTH = "both"
