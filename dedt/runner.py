"""Run a whole pipeline from Python, without Prefect: ``python -m dedt.runner NAME``.

The same ``plan`` + ``run_node`` calls the Prefect flow makes, in dependency order, in one
process. It starts in about a second (no server), so the fault-injection tests kill and re-run it
many times; it is also a way to run a pipeline where no Prefect server may start. Bad input exits
with code 2 and one message line, as ``dedt run`` does (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from dedt.config import PipelineConfig, resolve
from dedt.errors import exit_code
from dedt.pipeline import NodeResult, plan, run_node
from dedt.store_root import default_root, store_root


def run_pipeline(
    cfg: PipelineConfig,
    root: Path | str | None = None,
    *,
    check: bool = True,
    on_result: Callable[[NodeResult], None] | None = None,
) -> dict[str, NodeResult]:
    """Compute every stage of ``cfg`` in ``root`` (default ``$DEDT_HOME``); finished stages are reused.

    ``check`` runs :func:`dedt.preflight.preflight` first, so bad input fails before any work.
    """
    root = store_root(root) if root is not None else default_root()
    if check:
        from dedt.preflight import preflight

        preflight(cfg, root)
    planned = plan(cfg, root)
    results: dict[str, NodeResult] = {}
    for key in planned:
        results[key] = run_node(cfg, planned, key)
        if on_result is not None:
            on_result(results[key])
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dedt.runner", description=__doc__.splitlines()[0])
    parser.add_argument("name", help="pipeline name in the pipelines file")
    parser.add_argument("--pipelines", type=Path, default=Path("pipelines.yaml"), metavar="FILE")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    parser.add_argument(
        "--root", default=None, help="store root: a folder or s3://bucket/prefix (default $DEDT_HOME or ./.dedt)"
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)

    def report(result: NodeResult) -> None:
        line = {
            "key": result.key,
            "fingerprint": result.fingerprint,
            "cached": result.cached,
            "seconds": result.seconds,
            "path": result.path,
        }
        print(json.dumps(line), flush=True)

    return exit_code(
        lambda: run_pipeline(resolve(args.name, args.pipelines, args.overrides), args.root, on_result=report),
        debug=args.debug,
    )


if __name__ == "__main__":
    sys.exit(main())
