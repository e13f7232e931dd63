"""User-facing error types; the API maps each to one HTTP status in one place."""

from __future__ import annotations


class TesseraError(Exception):
    """Base of every error a user can cause; the message says what was wrong and what to do."""

    http_status = 400
    error_type = "BadRequestError"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequestError(TesseraError, ValueError):
    """A request (or a parameter of it) is invalid."""


class ContextLengthError(InvalidRequestError):
    """The prompt plus the requested tokens do not fit in the model's context."""


class ModelNotFoundError(TesseraError):
    """A request named a model this server does not serve."""

    http_status = 404
    error_type = "NotFoundError"


class QueueFullError(TesseraError):
    """The waiting queue is at its bound; retry later."""

    http_status = 429
    error_type = "RateLimitError"


class UnknownPluginError(TesseraError, KeyError):
    """A registry lookup named something that is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return self.message


class PluginLoadError(TesseraError, RuntimeError):
    """A plugin failed to import or register."""

    http_status = 500
    error_type = "InternalServerError"


class ConfigError(TesseraError, ValueError):
    """A configuration value is invalid or names a feature that is not built."""


class NotImplementedFeatureError(ConfigError):
    """A flag or parameter asks for a feature tessera does not have yet."""


class EngineDeadError(TesseraError, RuntimeError):
    """The engine core stopped; the server cannot serve."""

    http_status = 503
    error_type = "ServiceUnavailableError"
