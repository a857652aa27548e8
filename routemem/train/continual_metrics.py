"""Moved to ``routemem.train.continual.metrics``; this alias goes in the next release."""

import warnings

from routemem.train.continual.metrics import *  # noqa: F401,F403

warnings.warn("routemem.train.continual_metrics moved to routemem.train.continual.metrics; the old name "
              "goes in the next release", DeprecationWarning, stacklevel=2)
