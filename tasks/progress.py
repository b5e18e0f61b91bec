"""A stage's progress as a Prefect progress artifact and a log line (``dedt.progress`` callbacks).

The library calls the callback a few times a minute (``dedt.progress.REPORT_EVERY_S``); each call
updates the task run's progress artifact (created at the first call) and logs one line, which the
Prefect logger also prints to the terminal of ``dedt run``.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.logging import get_run_logger

from dedt.progress import ProgressFn, format_line


def artifact_progress(key: str) -> ProgressFn:
    """A callback that reports the progress of stage ``key`` inside the running Prefect task."""
    artifact: list[UUID] = []  # created at the first report: a cached stage makes none

    def on_progress(done: int, total: int, info: dict[str, Any]) -> None:
        line = format_line(key, done, total, info)
        percent = min(100.0, 100.0 * done / max(total, 1))
        logger = get_run_logger()
        try:
            if artifact:
                update_progress_artifact(artifact[0], percent, description=line)
            else:
                artifact.append(create_progress_artifact(percent, description=line))
        except Exception as exc:  # noqa: BLE001 - a dashboard hiccup must never end an hours-long stage
            logger.warning("progress artifact not updated: %s", exc)
        logger.info(line)

    return on_progress
