"""Errors that mean bad user input: the CLI prints the message alone and exits with code 2."""

import logging
import sys
from collections.abc import Callable


class DedtError(ValueError):
    """Bad input (config, data, artifact): the message names what, where, and the fix.

    The message is kept to one line (the CLI prints it alone): embedded line breaks, e.g. from a
    library's exception text, are folded into spaces.
    """

    def __init__(self, message: object = "", *args: object) -> None:
        super().__init__(" ".join(str(message).split()) if isinstance(message, str) else message, *args)


class DedtErrorLogFilter(logging.Filter):
    """Drops log records about a DedtError (an orchestrator's "task failed" traceback, its "Failed"
    state line): the CLI prints the error itself as one line. Other records pass untouched."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], DedtError):
            return False
        return "DedtError" not in record.getMessage()


def quiet_dedt_errors(*logger_names: str) -> None:
    """Attach :class:`DedtErrorLogFilter` to these loggers (e.g. ``"prefect.task_runs"``,
    ``"prefect.flow_runs"``); call it after the orchestrator has configured its logging."""
    for name in logger_names:
        logging.getLogger(name).addFilter(DedtErrorLogFilter())


def exit_code(action: Callable[[], None], *, debug: bool) -> int:
    """Run a command line's ``action``: 0 on success; bad input prints one ``dedt: error:`` line
    and gives 2 (the traceback only with ``debug``)."""
    try:
        action()
    except DedtError as exc:
        if debug:
            raise
        print(f"dedt: error: {exc}", file=sys.stderr)
        return 2
    return 0
