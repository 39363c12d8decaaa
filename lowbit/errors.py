"""The exceptions lowbit raises at its boundaries. Every message says what was wrong and what is valid."""


class LowbitError(Exception):
    """Base class: a user-facing error with a message that names the problem and the fix."""


class ConfigError(LowbitError, ValueError):
    """An invalid configuration, scheme, format or option."""


class CalibrationError(LowbitError, ValueError):
    """Calibration data missing, malformed, or producing non-finite values (names the layer)."""


class LoadError(LowbitError, OSError):
    """A saved model that cannot be loaded: missing, truncated or edited files (names the file)."""
