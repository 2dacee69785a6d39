"""Typed errors. Every message names the offending file, field or value and what was expected."""

from __future__ import annotations


class HyprecError(Exception):
    """Base class of every error hyprec raises on purpose."""


class ConfigError(HyprecError, ValueError):
    """An invalid option value or combination (dtype names, devices, batch sizes ...)."""


class ModelNotFoundError(HyprecError, FileNotFoundError):
    """A model name that is neither a local directory nor a known alias."""


class ModelLoadError(HyprecError):
    """A model directory whose files are missing, corrupt or inconsistent."""


class UnsupportedArchitectureError(HyprecError, ValueError):
    """A config.json naming an architecture hyprec has no implementation for."""


class InvalidInputError(HyprecError, ValueError):
    """User input (texts, files, parameters of a call) that cannot be processed."""


class InputTypeError(HyprecError, TypeError):
    """User input of the wrong Python type (e.g. a number where a text was expected)."""


class NonFiniteOutputError(HyprecError, FloatingPointError):
    """A computation produced NaN or inf; raised instead of returning the result."""


class OutputWriteError(HyprecError, OSError):
    """An output file could not be written after the work was done (the message says where the result went)."""
