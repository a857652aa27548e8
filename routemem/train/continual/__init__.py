"""Online class-incremental learning on a ViT: the loop (``loop.py``), the methods (``methods.py``
for the probe and fine-tuning, ``replay.py``, ``prompted.py`` for L2P / DualPrompt / CODA-Prompt,
``rwf.py``), their registry (``registry.py``) and the metrics (``metrics.py``).

``run_stream(method, stream)`` walks a stream once and measures; ``make_method(name, vit, ...)``
builds a registered method. A new method is one class plus its line in ``registry.py``.
"""

from routemem.train.continual.loop import predict_labels, result_to_json, run_stream
from routemem.train.continual.registry import METHODS, list_methods, make_method, method_options

__all__ = ["METHODS", "list_methods", "make_method", "method_options", "predict_labels", "result_to_json",
           "run_stream"]
