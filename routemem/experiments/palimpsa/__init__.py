"""The Palimpsa MQAR study (``routemem reproduce palimpsa``): protocol.py runs it, checks.py holds
the special-case checks, claims.py decides, report.py reports."""

from routemem.experiments.palimpsa.protocol import FULL, PAPER, QUICK, Setting, run, train_one

__all__ = ["FULL", "PAPER", "QUICK", "Setting", "run", "train_one"]
