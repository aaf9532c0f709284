"""Running many simulated devices on one machine: the fedrec command, runner and reports; the Python API."""

from .api import Report, Result, audit, load, report, run_config, simulate

__all__ = ["Report", "Result", "audit", "load", "report", "run_config", "simulate"]
