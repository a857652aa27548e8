"""The online class-incremental baselines study (``routemem reproduce ocl-baselines``): protocol.py
runs it, claims.py decides, report.py reports."""

from routemem.experiments.ocl_baselines.protocol import FULL, QUICK, Setting, run

__all__ = ["FULL", "QUICK", "Setting", "run"]
