"""Errors that mean bad user input: the CLI prints the message alone and exits with code 2."""


class DedtError(ValueError):
    """Bad input (config, data, artifact): the message names what, where, and the fix."""
