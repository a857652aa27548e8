"""``routemem reproduce all``: every study into one folder (run.py), then one report of every claim
(data.py gathers, report.py writes REPORT.md, html.py the page). Above the studies: it reaches
them only through ``routemem.experiments.STUDIES``."""
