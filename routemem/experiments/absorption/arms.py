"""The absorption study's arms (protocol.py says what each one is), shared by the protocol and
the report."""

TOKEN_ARMS = ("dense", "soft-learned", "soft-random", "hard", "mask-random")
BLOCK_ARMS = ("block-moba", "block-soft-learned", "block-soft-random", "block-hard", "block-own")
ARMS = TOKEN_ARMS + BLOCK_ARMS
LEARNED_GATES = ("soft-learned", "hard", "block-soft-learned", "block-hard")  # gate gradient logged
COLORS = {"dense": "tab:gray", "soft-learned": "tab:blue", "soft-random": "tab:orange", "hard": "tab:red",
          "mask-random": "tab:purple", "block-moba": "tab:green", "block-soft-learned": "tab:cyan",
          "block-soft-random": "tab:olive", "block-hard": "tab:brown", "block-own": "tab:pink"}
