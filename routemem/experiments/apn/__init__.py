"""The APN study (``routemem reproduce apn``): protocol.py runs it, claims.py decides, report.py reports."""

from routemem.experiments.apn.protocol import FULL, QUICK, Setting, run

__all__ = ["FULL", "QUICK", "Setting", "run"]
