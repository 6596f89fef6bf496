"""The library's own errors: each names what was wrong, where, and what was expected."""


class ILQLError(Exception):
    """Base class of every error ilql raises on purpose."""


class ConfigError(ILQLError, ValueError):
    """A configuration value is missing, unknown or out of its allowed range."""


class DataError(ILQLError, ValueError):
    """A sample, a reward or a data file cannot be turned into training episodes."""


class DataTypeError(ILQLError, TypeError):
    """A sample or a reward has the wrong Python type."""


class TrainingError(ILQLError, RuntimeError):
    """Training cannot go on (e.g. the loss stayed non-finite)."""
