"""The Routing-without-Forgetting study (``routemem reproduce rwf``): protocol.py runs it, claims.py
decides, report.py reports."""

from routemem.experiments.rwf.protocol import FULL, QUICK, Setting, run

__all__ = ["FULL", "QUICK", "Setting", "run"]
