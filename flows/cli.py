"""The ``dedt`` command line: run named pipelines from pipelines.yaml through Prefect."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import yaml

from dedt.errors import DedtError

EPILOG = """examples:
  dedt run digits-demo                       run the demo pipeline end to end (cached stages are skipped)
  dedt run digits-demo --dry-run             print the resolved config and stage fingerprints
  dedt run digits-demo --set select.keep_frac=0.2 --set dataset.source=mnist5k
  dedt list                                  list the pipelines in pipelines.yaml

environment:
  DEDT_HOME        store root for all artifacts (default ./.dedt)
  PREFECT_API_URL  a Prefect server to report to (default: Prefect's embedded local server)
exit codes: 0 ok, 1 internal error, 2 bad input (config, data, artifact)"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dedt", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Data-efficient diffusion training: prune a dataset with a surrogate encoder, "
                    "reweight its classes with group DRO, train and evaluate a diffusion model. "
                    "Every stage is cached in the store by a fingerprint of its config and inputs.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="run a named pipeline through Prefect",
                         description="Run pipeline NAME end to end: data, encode, score, select, reference, "
                                     "reweight, train, classifier, evaluate. Finished stages are reused.")
    run.add_argument("name", help="pipeline name in the pipelines file")
    run.add_argument("--pipelines", type=Path, default=Path("pipelines.yaml"), metavar="FILE",
                     help="YAML file with a 'pipelines:' mapping (default: pipelines.yaml)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                     help="override a config field, e.g. select.keep_frac=0.2 (repeatable)")
    run.add_argument("--dry-run", action="store_true", help="print the resolved config and fingerprints; run nothing")
    run.add_argument("--json", action="store_true", help="print the result as JSON instead of tables")
    ls = sub.add_parser("list", help="list the pipelines in a pipelines file")
    ls.add_argument("--pipelines", type=Path, default=Path("pipelines.yaml"), metavar="FILE")
    return parser


def _dry_run(args: argparse.Namespace) -> None:
    from dedt.config import resolve
    from dedt.pipeline import plan
    from dedt.store import default_root

    cfg = resolve(args.name, args.pipelines, args.overrides)
    print(yaml.safe_dump({args.name: cfg.model_dump(mode="json")}, sort_keys=False).rstrip())
    print(f"\nstore: {default_root()}")
    for key, node in plan(cfg, default_root()).items():
        status = "cached" if node.out.is_complete() else "to run"
        print(f"  {key:<22} {node.out.fingerprint}  {status}")


def _run(args: argparse.Namespace) -> None:
    from dedt.config import resolve
    from dedt.report import markdown_table

    resolve(args.name, args.pipelines, args.overrides)  # bad input fails here, before Prefect starts
    from flows.pipeline import pipeline_flow

    start = time.perf_counter()
    result = pipeline_flow(args.name, str(args.pipelines), args.overrides)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
        return
    stages = result["stages"]
    print("\nStages\n" + markdown_table(stages))
    computed = [s["stage"] for s in stages if s["status"] == "computed"]
    print(f"\n{len(stages) - len(computed)} of {len(stages)} stages cached"
          + ("; nothing recomputed" if not computed else f"; computed: {', '.join(computed)}"))
    print("\nSummary (speed-up = full-data training time / (subset training + selection + proxy))\n"
          + result["summary_markdown"])
    if result["weights"]:
        print("\nClass weights: " + ", ".join(f"{w:.3f}" for w in result["weights"]))
    print(f"\nwall-clock {time.perf_counter() - start:.1f}s")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The embedded server's first start migrates a fresh SQLite database: slow on 2 busy cores.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    args = build_parser().parse_args(argv)
    try:
        if args.command == "list":
            from dedt.config import load_pipelines

            for name in load_pipelines(args.pipelines):
                print(name)
        elif args.dry_run:
            _dry_run(args)
        else:
            _run(args)
    except DedtError as exc:
        if args.debug:
            raise
        print(f"dedt: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
