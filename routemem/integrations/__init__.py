"""Bridges to other libraries' model APIs; each sits above routemem.models and is imported only
when asked for (``import routemem.hf`` needs the ``hf`` extra)."""
