"""The node's exception hierarchy: one base, one class per failure the caller handles."""

from __future__ import annotations

from enum import StrEnum


class DcnNodeError(Exception):
    """Base of every error raised on purpose by dcn-node."""


class ConfigError(DcnNodeError):
    """The configuration file is unreadable or invalid; ``problems`` lists each issue."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = list(problems)
        listing = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid configuration {source}:\n{listing}")


class StoreUnavailableError(DcnNodeError):
    """The store's database (PostgreSQL, ``store.url``) cannot be reached: the server is
    down, unreachable, or dropped the connection. The message says where and why, never
    the URL's password; the node keeps running and uses the store again when it is back.
    """


class SpoolWriteError(DcnNodeError):
    """An instance could not be written durably (disk full, permissions, I/O error)."""


class InvalidInstanceError(DcnNodeError):
    """A received dataset cannot be parsed or lacks what the node needs to file it.

    ``code`` is a short fixed name of the problem (a metrics label): ``unparsable``,
    ``missing_uid``, ``no_pixel_data``, ``truncated`` or ``undecodable``.
    """

    def __init__(self, message: str, code: str = "unparsable") -> None:
        super().__init__(message)
        self.code = code


class FailureReason(StrEnum):
    """Why a series failed after it was accepted: decided once, from the exception, where
    it happened (the metrics label ``reason`` of dcn_series_failed_total)."""

    UNDECODABLE = "undecodable"  # its pixel data could not be read
    OUT_OF_MEMORY = "out_of_memory"
    MODEL_ERROR = "model_error"  # anything else while loading or running the model
    ENCODING_ERROR = "encoding_error"  # building or writing the result objects

    @classmethod
    def of_analysis(cls, exc: BaseException) -> FailureReason:
        """The reason for an exception raised while a series was read and analysed."""
        if isinstance(exc, InvalidInstanceError):
            return cls.UNDECODABLE
        # torch's OutOfMemoryError (a RuntimeError) and MemoryError by type; torch's CPU
        # allocator raises a plain RuntimeError that says so.
        if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or (
                isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)):
            return cls.OUT_OF_MEMORY
        return cls.MODEL_ERROR
