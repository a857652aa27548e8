"""The routing-absorption study (``routemem reproduce absorption``): protocol.py runs it, distill.py
distils the oracle gates, claims.py decides, report.py reports."""

from routemem.experiments.absorption.protocol import FULL, QUICK, Setting, run

__all__ = ["FULL", "QUICK", "Setting", "run"]
