"""routemem in the Hugging Face ecosystem (``pip install routemem[hf]``).

Importing this registers ``RoutememConfig`` / ``RoutememForCausalLM`` with ``AutoConfig`` /
``AutoModelForCausalLM`` under model type ``"routemem"``. ``routemem.hf`` is the short name.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from routemem.integrations.hf.cache import RoutememCache
from routemem.integrations.hf.config import RoutememConfig
from routemem.integrations.hf.convert import export_checkpoint, import_checkpoint
from routemem.integrations.hf.model import RoutememForCausalLM
from routemem.integrations.hf.swap import swap_layers

AutoConfig.register(RoutememConfig.model_type, RoutememConfig, exist_ok=True)
AutoModelForCausalLM.register(RoutememConfig, RoutememForCausalLM, exist_ok=True)

__all__ = ["RoutememCache", "RoutememConfig", "RoutememForCausalLM", "export_checkpoint", "import_checkpoint",
           "swap_layers"]
