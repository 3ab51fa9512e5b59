"""The root of ccat-dagster's error types: every error a user can act on derives from ``CcatError``."""


class CcatError(Exception):
    """An error whose message names the bad value and the fix; the CLI prints it as one line."""
