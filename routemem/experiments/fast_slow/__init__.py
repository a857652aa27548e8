"""The fast-slow coupling study (``routemem reproduce fast-slow``): protocol.py runs it, tasks.py
holds the topic control, theorem.py the numerical theorem check, claims.py decides, report.py reports."""

from routemem.experiments.fast_slow.protocol import FULL, QUICK, Setting, run

__all__ = ["FULL", "QUICK", "Setting", "run"]
