"""The ``dedt`` command line: run pipelines and sweeps from pipelines.yaml through Prefect, deploy
them to a Prefect server, and start/stop a local server with its workers."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import yaml

from dedt.errors import DedtError, exit_code

EPILOG = """examples:
  dedt run digits-demo                       run the demo pipeline end to end (cached stages are skipped)
  dedt run digits-demo --dry-run             print the resolved config and stage fingerprints
  dedt run digits-demo --set select.keep_frac=0.2 --set dataset.source=mnist5k
  dedt list                                  list the pipelines in pipelines.yaml
  dedt sweep digits-sweep                    run a grid of pipelines; shared stages run once
  dedt sweep frontier-mnist5k --report docs/RESULTS.md
                                             the time-to-quality benchmark and its report (~46 min)
  dedt sweep levers-data --report docs/RESULTS-levers-data.md
                                             the selection levers on the same benchmark (~55 min after it)
  dedt sweep levers-training --report docs/RESULTS-levers-training.md
                                             the training levers (~40 min after both)
  dedt sweep frontier-dirty --report docs/RESULTS-dirty.md
                                             the benchmark on contaminated data (~1.5 h after the main run)
  dedt run recipe-strata                     the best measured selection recipe (k-means strata, density band)
  dedt run recipe-fast                       the best measured combination (strata + min-snr + loss-aware)
  dedt export digits-demo --to models/digits  the trained model as a diffusers pipeline folder + model card
  dedt export --sweep digits-sweep --point 'select.keep_frac=0.1 score.method=knn' --to models/p
                                             a sweep point's model (the label as sweep --dry-run lists it)
  dedt export digits-demo --ema 0.075 --to models/d  its post-hoc EMA of sigma_rel 0.075 (train.posthoc_ema)
  dedt server start                          local Prefect server (127.0.0.1:4200) + a process worker
  dedt deploy                                every pipeline and sweep becomes a deployment
  prefect deployment run 'dedt-pipeline/digits-demo' --watch

environment:
  DEDT_HOME         store root for all artifacts (default ./.dedt), or s3://bucket/prefix
  DEDT_CACHE        this machine's cache of an s3:// store (default ~/.cache/dedt)
  DEDT_SERVER_HOME  state of `dedt server` (default $DEDT_HOME/../.prefect-server)
  PREFECT_API_URL   a Prefect server to report to (default: the `dedt server` when it runs,
                    else Prefect's embedded local server)
  PREFECT_LOGGING_HANDLERS_CONSOLE_CLASS
                    the console log handler (default: dedt's: Prefect's own, but printing task
                    names such as curve:train:uniform as written, without emoji codes)
exit codes: 0 ok, 1 internal error, 2 bad input (config, data, artifact)"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dedt",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
        description="Data-efficient diffusion training: prune a dataset with a surrogate encoder, "
        "reweight its classes with group DRO, train and evaluate a diffusion model. "
        "Every stage is cached in the store by a fingerprint of its config and inputs.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser(
        "run",
        help="run a named pipeline through Prefect",
        description="Run pipeline NAME end to end: data, encode, score, select, reference, "
        "reweight, train, classifier, evaluate. Finished stages are reused.",
    )
    run.add_argument("name", help="pipeline name in the pipelines file")
    run.add_argument(
        "--pipelines",
        type=Path,
        default=Path("pipelines.yaml"),
        metavar="FILE",
        help="YAML file with a 'pipelines:' mapping (default: pipelines.yaml)",
    )
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override a config field, e.g. select.keep_frac=0.2 (repeatable)",
    )
    run.add_argument("--dry-run", action="store_true", help="print the resolved config and fingerprints; run nothing")
    run.add_argument("--json", action="store_true", help="print the result as JSON instead of tables")
    export = sub.add_parser(
        "export",
        help="write a trained model as a diffusers pipeline folder with a model card",
        description="Write a model of pipeline NAME (already run: `dedt run NAME`), or of a "
        "sweep's point (--sweep, --point), to DIR as a "
        "standard diffusers pipeline folder (model_index.json, unet/, scheduler/, vae/ "
        "for latent models) that DDPMPipeline/DDIMPipeline.from_pretrained(DIR) load, "
        "and a README.md model card generated from the run's artifacts.",
    )
    export.add_argument("name", nargs="?", help="pipeline name in the pipelines file (or --sweep and --point)")
    export.add_argument("--sweep", metavar="SWEEP", help="export a point of this sweep (already run: `dedt sweep`)")
    export.add_argument(
        "--point",
        metavar="LABEL",
        help="the sweep point, as `dedt sweep SWEEP --dry-run` lists it, e.g. 'select.keep_frac=0.1 score.method=knn'",
    )
    export.add_argument("--pipelines", type=Path, default=Path("pipelines.yaml"), metavar="FILE")
    export.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="the same overrides the run had (they select its stages)",
    )
    export.add_argument(
        "--model",
        default="final",
        metavar="MODEL",
        help="final (pruned + reweighted, or the pipeline's last model), uniform (pruned) or "
        "reference (full data); default final",
    )
    export.add_argument(
        "--ema",
        nargs="?",
        metavar="SIGMA_REL|none",
        help="the weights: the run's own EMA (default, also a bare --ema), none = the raw weights, "
        "a number = the post-hoc EMA of that sigma_rel (a run with train.posthoc_ema: true)",
    )
    export.add_argument("--no-ema", dest="ema", action="store_const", const="none", help="the same as --ema none")
    export.add_argument("--to", type=Path, required=True, metavar="DIR", help="folder to write (must be empty)")
    export.add_argument("--force", action="store_true", help="replace an earlier export in DIR")
    ls = sub.add_parser("list", help="list the pipelines in a pipelines file")
    ls.add_argument("--pipelines", type=Path, default=Path("pipelines.yaml"), metavar="FILE")
    sweep = sub.add_parser(
        "sweep",
        help="run a sweep (a grid of pipelines) through Prefect",
        description="Run sweep NAME from the 'sweeps:' mapping: every grid point's pipeline, each "
        "distinct stage once, up to max_concurrency at a time; then one comparison "
        "table (Parquet in the store) and plots.",
    )
    sweep.add_argument("name", help="sweep name in the pipelines file")
    sweep.add_argument("--pipelines", type=Path, default=Path("pipelines.yaml"), metavar="FILE")
    sweep.add_argument("--dry-run", action="store_true", help="list the grid points and stages to run; run nothing")
    sweep.add_argument(
        "--report",
        type=Path,
        metavar="FILE.md",
        help="also write the frontier report (tables, plots beside it, the paper's claims) there",
    )
    deploy = sub.add_parser(
        "deploy",
        help="create or update a deployment per pipeline and sweep",
        description="Every pipeline becomes 'dedt-pipeline/NAME', every sweep 'dedt-sweep/NAME', "
        "every deployment.gpu_pool 'dedt-stage/POOL', with the pools, tags and cron "
        "schedules of the YAML. Idempotent: run it again after editing the YAML.",
    )
    deploy.add_argument("--pipelines", type=Path, default=Path("pipelines.yaml"), metavar="FILE")
    deploy.add_argument("--dry-run", action="store_true", help="print the deployments; create nothing")
    server = sub.add_parser(
        "server",
        help="start, stop or check a local Prefect server and its workers",
        description="A Prefect server on 127.0.0.1 with SQLite in $DEDT_SERVER_HOME, and one "
        "process worker per pool; the workers run flows with this DEDT_HOME.",
    )
    server.add_argument("action", choices=["start", "stop", "status"])
    server.add_argument("--port", type=int, default=4200, help="server port on 127.0.0.1 (default 4200)")
    server.add_argument(
        "--pool",
        dest="pools",
        action="append",
        metavar="POOL",
        help="start a process worker for POOL (repeatable; default: dedt-default)",
    )
    server.add_argument(
        "--query-seconds",
        type=float,
        default=2.0,
        metavar="S",
        help="how often workers poll for runs (PREFECT_WORKER_QUERY_SECONDS; Prefect's default 10)",
    )
    return parser


def _dry_run(args: argparse.Namespace) -> None:
    from dedt.config import resolve
    from dedt.pipeline import plan
    from dedt.store_root import default_root

    cfg = resolve(args.name, args.pipelines, args.overrides)
    print(yaml.safe_dump({args.name: cfg.model_dump(mode="json")}, sort_keys=False).rstrip())
    print(f"\nstore: {default_root()}")
    for key, node in plan(cfg, default_root()).items():
        status = "cached" if node.out.is_complete() else "to run"
        print(f"  {key:<22} {node.out.fingerprint}  {status}")


def _run(args: argparse.Namespace) -> None:
    from dedt.config import resolve
    from dedt.preflight import preflight
    from dedt.report import markdown_table
    from dedt.store_root import default_root

    # Bad input fails here, before Prefect starts and before any work.
    preflight(resolve(args.name, args.pipelines, args.overrides), default_root())
    from flows.pipeline import pipeline_flow

    if not args.debug:
        from dedt.errors import quiet_dedt_errors

        quiet_dedt_errors("prefect.task_runs", "prefect.flow_runs")

    start = time.perf_counter()
    result = pipeline_flow(args.name, str(args.pipelines), args.overrides)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
        return
    stages = result["stages"]
    print("\nStages\n" + markdown_table(stages))
    computed = [s["stage"] for s in stages if s["status"] == "computed"]
    print(
        f"\n{len(stages) - len(computed)} of {len(stages)} stages cached"
        + ("; nothing recomputed" if not computed else f"; computed: {', '.join(computed)}")
    )
    print(
        "\nSummary. speed-up = equal-quality speed-up: the time the full-data model needs to reach this model's FD "
        "on its own curve / this model's cost (selection and proxy included; calibrated seconds). Below 1x, "
        "training on all the data for less time was better. 'scratch' also counts training the DRO reference.\n"
        + result["summary_markdown"]
    )
    if result["weights"]:
        print("\nClass weights: " + ", ".join(f"{w:.3f}" for w in result["weights"]))
    relation = result.get("weights_vs_difficulty")
    if relation:
        print(
            f"Weights vs the full-data model's per-class FD: Spearman {relation['spearman_weight_vs_reference_fd']} "
            "(negative = more weight on easily generated classes, as the paper reports); "
            f"reweighting improved per-class FD for {relation['classes_improved']} of {relation['classes']} classes"
        )
    if result.get("exported"):
        print(f"\nexported the model (diffusers pipeline + model card) to {result['exported']}")
    print(f"\nwall-clock {time.perf_counter() - start:.1f}s")


def _export(args: argparse.Namespace) -> None:
    from dedt.config import resolve
    from dedt.export import export_model, parse_ema, sweep_point
    from dedt.store_root import default_root

    ema = parse_ema(args.ema)  # first: a bare --ema before NAME takes NAME as its value
    if (args.name is None) == (args.sweep is None) or (args.sweep is None) != (args.point is None):
        raise DedtError("export takes a pipeline NAME, or --sweep SWEEP with --point LABEL")
    if args.sweep is not None and args.overrides:
        raise DedtError("--set applies to a pipeline; a sweep point's config is its grid's values")
    if args.sweep is None:
        cfg, command, source = resolve(args.name, args.pipelines, args.overrides), None, args.name
    else:
        cfg, command = sweep_point(args.sweep, args.pipelines, args.point)
        source = f"sweep {args.sweep} point {args.point!r}"
    folder = export_model(cfg, default_root(), args.model, args.to, ema=ema, force=args.force, command=command)
    print(f"exported the {args.model} model of {source} to {folder} (model card: {folder / 'README.md'})")


def _use_local_server() -> None:
    """Report to the running `dedt server` unless PREFECT_API_URL names another server; send its auth
    string when PREFECT_API_URL is that server's and no PREFECT_API_AUTH_STRING is set."""
    from flows.server import LOOPBACK_API, running_server

    url = os.environ.get("PREFECT_API_URL")
    if url and not LOOPBACK_API.fullmatch(url):
        return
    state = running_server()
    if state and (url or state["api_url"]) == state["api_url"]:
        os.environ["PREFECT_API_URL"] = state["api_url"]
        if state.get("auth"):
            os.environ.setdefault("PREFECT_API_AUTH_STRING", state["auth"])


def _sweep(args: argparse.Namespace) -> None:
    from dedt.pipeline import plan
    from dedt.store_root import default_root
    from dedt.sweep import expand, unique_nodes

    points = expand(args.name, args.pipelines)  # bad input fails here, before Prefect starts
    if args.dry_run:
        plans = [plan(p.cfg, default_root()) for p in points]
        nodes = unique_nodes(plans)
        todo = sum(not plans[n.point][n.key].out.is_complete() for n in nodes)
        print("\n".join(f"  {p.label}" for p in points))
        print(f"{len(points)} points, {len(nodes)} distinct stages, {todo} to run (store {default_root()})")
        return
    from flows.sweep import sweep_flow

    start = time.perf_counter()
    result = sweep_flow(args.name, str(args.pipelines), report=str(args.report) if args.report else None)
    print(f"\n{len(result['points'])} points, {result['stages']} distinct stages, {result['computed']} computed\n")
    print(result["table_markdown"])
    print(
        f"\ncomparison: {result['comparison']}"
        + (f"\nreport: {result['report']}" if result["report"] else "")
        + f"\nwall-clock {time.perf_counter() - start:.1f}s"
    )


def _deploy(args: argparse.Namespace) -> None:
    from flows.deploy import apply, deployment_specs

    specs = deployment_specs(args.pipelines)  # validates every pipeline and sweep first
    if not args.dry_run:
        if not os.environ.get("PREFECT_API_URL"):
            raise DedtError("no Prefect server to deploy to: `dedt server start`, or set PREFECT_API_URL")
        apply(specs)
    for spec in specs:
        schedule = f"  cron '{spec.cron}'" if spec.cron else ""
        print(f"{spec.full_name:<36} pool {spec.work_pool:<14} tags {','.join(spec.tags)}{schedule}")
    if not args.dry_run:
        print(f"\n{len(specs)} deployments applied to {os.environ['PREFECT_API_URL']}")


def _exports(info: dict) -> str:
    """The variables a shell needs for `prefect` commands against this server (its auth string is secret)."""
    auth = f" PREFECT_API_AUTH_STRING='{info['auth']}'" if info.get("auth") else ""
    return f"PREFECT_API_URL={info['api_url']}{auth}"


def _server(args: argparse.Namespace) -> None:
    from flows import server

    if args.action == "start":
        info = server.start(args.port, args.pools or [server.DEFAULT_POOL], args.query_seconds)
        print(f"Prefect server  {info['ui_url']}  (state {info['state']}, store {info['store']})")
        print("workers         " + ", ".join(k.removeprefix("worker:") for k in info["pids"] if k != "server"))
        print(f"\nexport {_exports(info)}   # for `prefect` commands in this shell")
    elif args.action == "stop":
        stopped = server.stop()
        print("stopped: " + ", ".join(stopped) if stopped else "no dedt server was running")
    else:
        info = server.status()
        if info is None:
            print(f"no dedt server (state folder {server.state_dir()})")
            return
        print(f"Prefect server  {info['ui_url']}  {'healthy' if info['healthy'] else 'NOT answering'}")
        for name, alive in info["alive"].items():
            print(f"  {name:<24} pid {info['pids'][name]:<8} {'running' if alive else 'stopped'}")
        print(f"state {info['state']}  store {info['store']}\nexport {_exports(info)}")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Nothing reaches the network at run time: Prefect's usage analytics stay off for the server,
    # its client and every process they start, whatever the calling shell says.
    os.environ.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1")
    # The embedded server's first start migrates a fresh SQLite database: slow on 2 busy cores.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    # Task names such as curve:train:uniform print as written, not with ":train:" as an emoji.
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_CLASS", "flows.console.PlainNamesConsoleHandler")
    args = build_parser().parse_args(argv)
    return exit_code(lambda: _dispatch(args), debug=args.debug)


def _dispatch(args: argparse.Namespace) -> None:
    if args.command == "list":
        from dedt.config import load_pipelines

        for name in load_pipelines(args.pipelines):
            print(name)
    elif args.command == "server":
        _server(args)
    elif args.command == "export":
        _export(args)
    elif args.command == "run" and args.dry_run:
        _dry_run(args)
    else:
        _use_local_server()
        {"run": _run, "sweep": _sweep, "deploy": _deploy}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
