"""routemem: routed and memory-carrying transformer layers, with the stack that tests them."""

__version__ = "0.1.0"
