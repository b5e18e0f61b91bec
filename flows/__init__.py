"""Prefect flows over dedt's stage tasks (pipeline, sweep, one dispatched stage), the deployments
made from pipelines.yaml, a local server with its workers, and the ``dedt`` command line."""
