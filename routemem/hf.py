"""``import routemem.hf``: the short name of routemem.integrations.hf (needs the ``hf`` extra)."""

from routemem.integrations.hf import *  # noqa: F403  (the alias re-exports it whole)
from routemem.integrations.hf import __all__  # noqa: F401
