"""Thin Prefect tasks over adaptflow.stages: retries, timing, logging and artifacts live here, logic does not."""
