"""Pure functions on tensors: each op has a plain ``reference`` and fast forms tested equal to it."""
