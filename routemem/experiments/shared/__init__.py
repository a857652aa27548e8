"""What the studies share and none of them owns: verdict rules, summaries and outputs (common.py),
the run cache (cache.py), units of work over processes and shards (runner.py), and the tasks two
studies run: byte-level language modelling (text_lm.py), pretrain-then-adapt (adaptation.py), the
ViT backbone and online stream runner (vit_stream.py) and its tables and plots (stream_report.py).

A study imports from here, never from another study."""
