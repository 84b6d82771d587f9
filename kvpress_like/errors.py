"""Exceptions raised by kvpress_like. Every message says what was wrong and what is valid."""

from __future__ import annotations


class KVPressLikeError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(KVPressLikeError, ValueError):
    """A method, part or budget configuration is invalid."""


class UnknownNameError(ConfigError, KeyError):
    """A method or part name is not registered."""

    def __init__(self, kind: str, name: object, valid: list[str]):
        self.kind, self.name, self.valid = kind, name, sorted(valid)
        super().__init__(f"unknown {kind} {name!r}; valid {kind}s are: {', '.join(self.valid) or '(none)'}")

    def __str__(self) -> str:  # KeyError would quote the message otherwise
        return self.args[0]


class DuplicateRegistrationError(KVPressLikeError):
    """Two plugins registered the same name for the same kind of part."""


class UnsupportedModelError(KVPressLikeError, TypeError):
    """The model's architecture has no adapter."""


class UnsupportedInputError(KVPressLikeError, ValueError):
    """The inputs given to a pipeline cannot be compressed as they are."""
