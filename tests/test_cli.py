"""The command line: help, dry run, and exit code 2 with one message on bad input."""

import os
import subprocess
import sys

import pytest

from flows.cli import main


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "run" in out and "DEDT_HOME" in out and "exit codes" in out


def test_dry_run_prints_config_and_fingerprints(capsys, store, pipelines_file):
    assert main(["run", "tiny", "--pipelines", str(pipelines_file), "--dry-run", "--set", "select.keep_frac=0.2"]) == 0
    out = capsys.readouterr().out
    assert "keep_frac: 0.2" in out and "to run" in out and "reweight" in out
    assert not store.exists()  # nothing written


@pytest.mark.parametrize(
    "args,needle",
    [
        (["run", "nope"], "no pipeline 'nope'"),
        (["run", "tiny", "--set", "select.keep_frac=2"], "select.keep_frac"),
        (["run", "tiny", "--set", "score.method=magic"], "score.method"),
        (["run", "tiny", "--set", "oops"], "key.path=value"),
    ],
)
def test_bad_input_exits_2_with_one_line(args, needle, store, pipelines_file):
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", *args, "--pipelines", str(pipelines_file)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not store.exists()


def test_console_prints_task_names_as_written(monkeypatch, capsys):
    import io
    import logging

    from prefect.logging.handlers import PrefectConsoleHandler

    from flows.console import PlainNamesConsoleHandler

    record = logging.LogRecord("prefect", logging.INFO, __file__, 1, "Task run 'curve:train:uniform'", None, None)
    printed = {}
    for handler_class in (PrefectConsoleHandler, PlainNamesConsoleHandler):
        stream = io.StringIO()
        handler = handler_class(stream=stream)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.emit(record)
        printed[handler_class] = stream.getvalue()
    assert "curve:train:uniform" not in printed[PrefectConsoleHandler]  # rich's :train: emoji
    assert "curve:train:uniform" in printed[PlainNamesConsoleHandler]
    monkeypatch.setenv("PREFECT_LOGGING_HANDLERS_CONSOLE_CLASS", "")  # restored (or removed) after the test
    monkeypatch.delenv("PREFECT_LOGGING_HANDLERS_CONSOLE_CLASS")
    main(["list"])  # dedt installs it for every command
    assert os.environ["PREFECT_LOGGING_HANDLERS_CONSOLE_CLASS"] == "flows.console.PlainNamesConsoleHandler"
