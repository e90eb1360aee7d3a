"""Errors a user can act on. The CLI prints them as one line and exits with status 2."""


class SeedtuneError(Exception):
    """Bad input or state that the user can fix; the message says what and how."""


class ConfigError(SeedtuneError):
    """A configuration key or value is invalid."""


class RunDirError(SeedtuneError):
    """A run directory is missing, unreadable, or not what the command expects."""


class BudgetExhausted(SeedtuneError):
    """A release would take a ledger past its privacy budget; nothing was released."""
