"""Prefect's console log handler with emoji codes left as written.

rich turns ``:name:`` into an emoji, and dedt's task run names hold such pairs: ``curve:train:uniform``
printed as ``curve🚋uniform``. ``dedt`` installs this handler for the console (``main`` sets
``PREFECT_LOGGING_HANDLERS_CONSOLE_CLASS`` before Prefect sets up its logging); colours, markup and
levels stay Prefect's.
"""

from __future__ import annotations

import logging

from prefect.logging.handlers import PrefectConsoleHandler


class PlainNamesConsoleHandler(PrefectConsoleHandler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.console.print(self.format(record), soft_wrap=True, emoji=False)
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)
