"""One error root for Tandem.

Callers decide what to do by the ``retriable`` flag, not by listing types; third-party
errors are wrapped at the boundary with ``raise ... from exc`` so the cause stays visible.
"""


class TandemError(Exception):
    retriable: bool = False


class ConfigError(TandemError):
    """The configuration cannot be used; nothing was started."""


class TopicError(TandemError):
    """A topic is missing or has the wrong shape."""


class BrokerUnavailable(TandemError):
    """A cluster could not be reached within the configured time."""

    retriable = True


class MalformedMessage(TandemError):
    """A record on an internal topic could not be decoded; it is skipped and counted."""


class Fenced(TandemError):
    """Another process took over this transactional id; this one must stop writing."""


class UsageError(TandemError):
    """A command asks for something that cannot be done as given (a set that does not exist,
    a target that does not fit); it was refused before anything was written."""
