"""The node's exception hierarchy: one base, one class per failure the caller handles."""

from __future__ import annotations


class DcnNodeError(Exception):
    """Base of every error raised on purpose by dcn-node."""


class ConfigError(DcnNodeError):
    """The configuration file is unreadable or invalid; ``problems`` lists each issue."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = list(problems)
        listing = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid configuration {source}:\n{listing}")


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
