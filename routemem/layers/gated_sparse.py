"""Gated sparse attention (routing absorption, arXiv 2603.02227): causal multi-head attention whose
keys are weighted or chosen by a per-head low-rank gate s_ij = (A x_i) . (B x_j) / sqrt(r).

Options (``mixer_kwargs``):
    granularity  "token" (each query chooses keys) | "block" (each query block chooses key blocks,
             the field's form: block_routing.py and ops/gated_sparse/block.py)
    gate     "learned" | "random" (A, B frozen at their initial values) | "none" (no gate: plain
             causal attention, no gate parameters) | "moba" (block only: the attention's own q . k
             block means, no parameters)
    mode     "soft" (logits += log sigmoid(s / tau)) | "hard" (each query keeps its k best keys by
             gate score; the gate gets exactly zero gradient). "hard" needs a gate.
    k        keys per query for hard mode, random masks and the oracle, at most max_seq_len (a
             larger k would keep every key). None means max(1, max_seq_len // 8): fixed at
             construction, so the parallel form and step() keep the same k, and it is T / 8 at the
             full context.
    rank, tau   the gate's rank r and the soft temperature.
    hard_form    how hard mode attends: "gather" (only the k kept keys per query are gathered:
             O(T k) memory for the attention part, the form for long contexts) or "mask" (the
             top-k as a boolean T x T mask to SDPA: O(T^2) memory, but faster at short contexts
             on a CPU: 4x at T = 256). The same function (tests hold them equal); the gate gets
             zero gradient either way, the mask being built from integer indices.
    mask_randomisation   p in [0, 1]: each training forward draws u = torch.rand(()) from the global
             CPU generator and, if u < p, the whole batch attends with ``random_causal_mask(B, H, T,
             k)`` (drawn next from the same generator) instead of the gate. p = 0 draws nothing.
             Eval mode and step() never randomise.
    deploy   which path eval mode and step() use: "gate" (the gate as in training), "dense" (plain
             causal attention, the gate ignored) or "oracle" (each query's k keys of highest dense
             attention probability in this layer, ``oracle_mask(attention_probs(q, k), k)``).
             Training always uses the gate (or a random mask). ``set_deploy`` switches it later.
    block_size, top_k_blocks, block_form   (block only) query and key blocks of block_size tokens;
             each query block reads its own block and, by the gate, top_k_blocks past key blocks
             (hard) or every past block with log sigmoid(score / tau) on its keys (soft).
             top_k_blocks None means max(1, ceil(max_seq_len / block_size) // 8). block_form is
             the op's mode: "auto" (flex_attention on CUDA, gathered SDPA otherwise), "gather",
             "flex", "reference". k, hard_form and mask_randomisation are token options.

Attention-probability dropout is not applied (the block's residual dropout is). A and B start at
N(0, 1 / d_model) so that the scores have unit scale: at the model's 0.02 init they would be ~0.05,
and a frozen random soft gate would be the constant log sigmoid(0).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from routemem.errors import ConfigError
from routemem.layers.attention import split_qkv
from routemem.layers.block_routing import BlockRouting, gate_feature_width, uses_scores
from routemem.layers.options import check_choice, check_int, check_positive
from routemem.layers.registry import LayerSpec, register_mixer
from routemem.layers.rope import rope_tables
from routemem.ops.gated_sparse import attention_probs, gate_scores, gated_attention, oracle_mask, random_causal_mask
from routemem.ops.gated_sparse.block_select import block_attention_mass
from routemem.ops.gated_sparse.selection import topk_mask

GATES, MODES, DEPLOYS = ("learned", "random", "none", "moba"), ("soft", "hard"), ("gate", "dense", "oracle")
HARD_FORMS = ("gather", "mask")
GRANULARITIES, BLOCK_FORMS = ("token", "block"), ("auto", "gather", "flex", "reference")
BLOCK = {"granularity": "block", "block_size": 4, "top_k_blocks": 1}  # the registry's block variants


@register_mixer("gated_sparse", variants={
    "hard": {"mode": "hard", "k": 3}, "hard mask": {"mode": "hard", "hard_form": "mask", "k": 3},
    "random gate": {"gate": "random"}, "no gate": {"gate": "none"},
    "mask randomisation": {"mask_randomisation": 0.5, "k": 3},
    "block moba": {**BLOCK, "gate": "moba", "mode": "hard"}, "block soft": BLOCK,
    "block hard": {**BLOCK, "mode": "hard"}})
class GatedSparseAttention(nn.Module):
    """Options in the module docstring. ``track_stats`` (attribute, default False): when True each
    forward also measures, under no_grad, what ``metrics()`` reports (a T x T map per head)."""

    def __init__(self, spec: LayerSpec, gate: str = "learned", mode: str = "soft", k: int | None = None,
                 rank: int = 16, tau: float = 1.0, mask_randomisation: float = 0.0, deploy: str = "gate",
                 hard_form: str = "gather", bias: bool = False, granularity: str = "token", block_size: int = 64,
                 top_k_blocks: int | None = None, block_form: str = "auto"):
        super().__init__()
        owner = "mixer 'gated_sparse'"
        self.granularity = check_choice(owner, "granularity", granularity, GRANULARITIES)
        self.gate = check_choice(owner, "gate", gate, GATES)
        self.mode = check_choice(owner, "mode", mode, MODES)
        if mode == "hard" and gate == "none":
            raise ConfigError(f"{owner}: mode 'hard' needs a gate to rank the keys (gate 'learned', 'random' or 'moba'), got gate 'none'")
        self.block = None
        if granularity == "block":
            self.block = _block_routing(owner, spec, block_size, top_k_blocks, block_form, tau,
                                        k=k, hard_form=hard_form, mask_randomisation=mask_randomisation)
        elif gate == "moba" or top_k_blocks is not None or block_form != "auto":
            raise ConfigError(f"{owner}: gate 'moba', top_k_blocks and block_form are options of granularity 'block'")
        self.k = max(1, spec.max_seq_len // 8) if k is None else check_int(owner, "k", k)
        if self.k > spec.max_seq_len:  # no query has more keys than that: "sparse" would be dense
            raise ConfigError(f"{owner}: k={self.k} is larger than max_seq_len={spec.max_seq_len}: every query "
                              f"would keep every key (top-k, random masks and the oracle would be dense "
                              f"attention); give k <= {spec.max_seq_len}")
        self.rank = check_int(owner, "rank", rank)
        self.tau = check_positive(owner, "tau", tau)
        self.hard_form = check_choice(owner, "hard_form", hard_form, HARD_FORMS)
        if isinstance(mask_randomisation, bool) or not isinstance(mask_randomisation, (int, float)) \
                or not 0 <= mask_randomisation <= 1:
            raise ConfigError(f"{owner}: mask_randomisation must be a number in [0, 1], got {mask_randomisation!r}")
        self.p_random = float(mask_randomisation)
        self.set_deploy(deploy)
        if spec.d_model % spec.n_head:
            raise ConfigError(f"{owner}: d_model={spec.d_model} is not divisible by n_head={spec.n_head}")
        self.n_head, self.head_dim = spec.n_head, spec.d_model // spec.n_head
        self.max_seq_len = spec.max_seq_len
        self.qkv = nn.Linear(spec.d_model, 3 * spec.d_model, bias=bias)
        self.out = nn.Linear(spec.d_model, spec.d_model, bias=bias)
        if self.gate in ("learned", "random"):
            self.gate_q = nn.Linear(spec.d_model, self.n_head * self.rank, bias=False)  # A
            self.gate_k = nn.Linear(spec.d_model, self.n_head * self.rank, bias=False)  # B
            self._init_weights()
            if self.gate == "random":
                for param in (self.gate_q.weight, self.gate_k.weight):
                    param.requires_grad_(False)
        self.use_rope = spec.pos == "rope"
        if self.use_rope:
            cos, sin = rope_tables(spec.max_seq_len, self.head_dim)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.track_stats = False
        self.last_path: str | None = None  # which path the last forward took (for tests and logs)
        self._stats: dict[str, torch.Tensor] = {}

    def set_deploy(self, deploy: str) -> None:
        self.deploy = check_choice("mixer 'gated_sparse'", "deploy", deploy, DEPLOYS)

    def _init_weights(self) -> None:
        if self.gate in ("learned", "random"):
            with torch.no_grad():
                for linear in (self.gate_q, self.gate_k):
                    linear.weight.normal_(0.0, linear.in_features ** -0.5)

    def residual_weights(self) -> list[nn.Parameter]:
        return [self.out.weight]  # not the gate's B, which is the last nn.Linear registered

    # -- the pieces -----------------------------------------------------------------------------
    def _heads(self, x: torch.Tensor, start: int):
        rope = (self.rope_cos, self.rope_sin) if self.use_rope else None
        return split_qkv(self.qkv(x), self.n_head, self.head_dim, rope, start)

    def _gate_heads(self, x: torch.Tensor):
        """x [B, T, D] -> gq, gk [B, T, H, r]."""
        B, T, _ = x.shape
        return (self.gate_q(x).view(B, T, self.n_head, self.rank),
                self.gate_k(x).view(B, T, self.n_head, self.rank))

    def _path(self) -> str:
        """"dense" | "soft" | "hard" | "oracle" | "random" for this forward (module docstring)."""
        gated = "dense" if self.gate == "none" else self.mode
        if self.training:
            if self.p_random > 0 and float(torch.rand(())) < self.p_random:
                return "random"
            return gated
        return {"gate": gated, "dense": "dense", "oracle": "oracle"}[self.deploy]

    def _gate_features(self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """The per-token features the gate scores with, [B, T, H, r]: moba's are q and k."""
        return (q, k) if self.gate == "moba" else self._gate_heads(x)

    def maps(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """x [B, T, D] -> (gate scores or None, dense attention probabilities), both [B, H, T, T]
        (block granularity: block scores and each query block's mass on each key block, [B, H, n, n]):
        what gate distillation and its F1 against the oracle read."""
        q, k, _ = self._heads(x, 0)
        if self.block is not None:
            scores = self.block.scores(*self._gate_features(x, q, k)) if self.gate != "none" else None
            return scores, block_attention_mass(q, k, self.block.block_size)
        scores = gate_scores(*self._gate_heads(x)) if self.gate != "none" else None
        return scores, attention_probs(q, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self._heads(x, 0)
        if self.training and self.p_random > 0 and torch.compiler.is_compiling():
            # A compiled graph cannot branch on the draw: it attends both ways and the draw picks
            # one (twice the attention cost; the random stream differs from eager's).
            self.last_path = "random or gate"
            gated = "dense" if self.gate == "none" else self.mode
            use_random = torch.rand(()) < self.p_random
            y = torch.where(use_random, self._attend("random", x, q, k, v)[0], self._attend(gated, x, q, k, v)[0])
            scores = None
        else:
            path = self.last_path = self._path()
            y, scores = self._attend(path, x, q, k, v)
        if self.track_stats:
            self._measure(x, q, k, scores)
        return self.out(y.reshape(B, T, D))

    def _attend(self, path: str, x, q, k, v) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The attention of one path (``_path``): (y [B, T, H, Dh], the gate scores it used or None)."""
        B, T, _ = x.shape
        if self.block is not None:
            scores = self.block.scores(*self._gate_features(x, q, k)) if uses_scores(self.gate, path) else None
            return self.block.attend(path, q, k, v, scores), scores
        scores = gate_scores(*self._gate_heads(x)) if self.gate != "none" and path in ("soft", "hard") else None
        if path == "soft":
            y = gated_attention(q, k, v, gating="soft", gate_scores=scores, tau=self.tau)
        elif path == "hard" and self.hard_form == "mask":
            y = gated_attention(q, k, v, gating="mask", mask=topk_mask(scores.detach(), self.k))
        elif path == "hard":
            y = gated_attention(q, k, v, gating="hard", gate_scores=scores, top_k=self.k)
        elif path == "oracle":
            with torch.no_grad():  # a mask: integers only, nothing to differentiate
                mask = oracle_mask(attention_probs(q, k), self.k)
            y = gated_attention(q, k, v, gating="mask", mask=mask)
        elif path == "random":
            y = gated_attention(q, k, v, gating="mask", mask=random_causal_mask(B, self.n_head, T, self.k, device=x.device))
        else:
            y = gated_attention(q, k, v)
        return y, scores

    # -- token-by-token decoding with a KV cache (and the gate's keys) ---------------------------
    def init_state(self, batch_size: int, device=None, dtype=torch.float32) -> dict:
        empty = torch.zeros(batch_size, self.n_head, 0, self.head_dim, device=device, dtype=dtype)
        gate_keys = torch.zeros(batch_size, self.n_head, 0, self.rank, device=device, dtype=dtype)
        state = {"k": empty, "v": empty.clone(), "gk": gate_keys, "pos": 0}
        if self.block is not None:  # the gate's query features: a block chooses by its predecessor's
            state["gq"] = torch.zeros(batch_size, self.n_head, 0, gate_feature_width(self.gate, self.head_dim, self.rank),
                                      device=device, dtype=dtype)
        return state

    def step(self, x_t: torch.Tensor, state: dict | None) -> tuple[torch.Tensor, dict]:
        """x_t [B, D] -> (y_t [B, D], state): the deployment path, as forward in eval mode. Query t
        sees keys 0..t in both forms, so its soft bias, gate top-k and oracle top-k (ties to the
        lower key index, a stable sort as in the ops) are the same as in the parallel form. At
        block granularity the choice reads only complete earlier blocks (block_routing.py); the
        block oracle, which reads the whole query block, cannot decode (ValueError)."""
        B, D = x_t.shape
        if state is None:
            state = self.init_state(B, x_t.device, x_t.dtype)
        q, k, v = (t.transpose(1, 2) for t in self._heads(x_t[:, None], state["pos"]))  # [B, H, 1, Dh]
        keys = torch.cat([state["k"], k.to(state["k"].dtype)], dim=2).to(q.dtype)
        values = torch.cat([state["v"], v.to(state["v"].dtype)], dim=2).to(q.dtype)
        gate_keys = state["gk"]
        path = {"gate": "dense" if self.gate == "none" else self.mode, "dense": "dense", "oracle": "oracle"}[self.deploy]
        logits = q @ keys.transpose(-1, -2) * self.head_dim ** -0.5  # [B, H, 1, t + 1]
        new_state = {"pos": state["pos"] + 1}
        if self.block is not None:
            q_feats = k_feats = None
            if self.gate == "moba":
                q_feats, k_feats = torch.cat([state["gq"], q.to(state["gq"].dtype)], dim=2).to(q.dtype), keys
            elif self.gate != "none":
                gq, gk = (t.transpose(1, 2) for t in self._gate_heads(x_t[:, None]))  # [B, H, 1, r]
                gate_keys = torch.cat([gate_keys, gk.to(gate_keys.dtype)], dim=2)
                q_feats, k_feats = torch.cat([state["gq"], gq.to(state["gq"].dtype)], dim=2).to(q.dtype), gate_keys.to(q.dtype)
            logits = self.block.decode_logits(path, logits, q_feats, k_feats)
            new_state["gq"] = state["gq"] if q_feats is None else q_feats.to(state["gq"].dtype)
        elif self.gate != "none":
            gq, gk = (t.transpose(1, 2) for t in self._gate_heads(x_t[:, None]))  # [B, H, 1, r]
            gate_keys = torch.cat([gate_keys, gk.to(gate_keys.dtype)], dim=2)
            s = gq @ gate_keys.to(gq.dtype).transpose(-1, -2) / math.sqrt(self.rank)
            if path == "soft":
                logits = logits + F.logsigmoid(s / self.tau)
            elif path == "hard":
                logits = logits.masked_fill(~_top_k_row(s, self.k), float("-inf"))
        if path == "oracle" and self.block is None:
            logits = logits.masked_fill(~_top_k_row(logits.softmax(dim=-1), self.k), float("-inf"))
        y = logits.softmax(dim=-1) @ values
        y = self.out(y.transpose(1, 2).reshape(B, D))
        return y, {"k": keys.to(state["k"].dtype), "v": values.to(state["v"].dtype), "gk": gate_keys, **new_state}

    # -- statistics and accounting --------------------------------------------------------------
    @torch.no_grad()
    def _measure(self, x, q, k, scores) -> None:
        """Concentration: the mean share of dense attention mass in each query's top k keys, over
        the queries with more than k causal keys (i >= k; 1.0 when T <= k, every key is kept).
        With a gate: the rms of its causal scores, the mean sigmoid(s / tau), and the F1 (overlap
        share) of its top-k key set with the oracle's, over the same queries."""
        if self.block is not None:
            if scores is None and self.gate != "none":
                scores = self.block.scores(*self._gate_features(x, q, k))
            self._stats = self.block.measure(q, k, scores)
            return
        probs = attention_probs(q.detach(), k.detach()).float()
        T = probs.shape[-1]
        rows = slice(self.k, None) if T > self.k else slice(0, T)
        oracle = oracle_mask(probs, self.k)
        # Kept as 0-dim tensors (read by metrics()): no device sync here, and no graph break
        # when the forward is compiled. Means over the causal entries are masked sums, not
        # boolean indexing, whose output shape would depend on the data.
        stats = {"concentration": (probs * oracle).sum(-1)[..., rows].mean()}
        if self.gate != "none":
            s = (scores if scores is not None else gate_scores(*self._gate_heads(x))).detach().float()
            causal = torch.ones(T, T, dtype=torch.bool, device=s.device).tril()
            n_causal = causal.sum() * s[..., 0, 0].numel()
            picked = topk_mask(s, self.k)
            stats.update(gate_score_rms=(torch.where(causal, s.pow(2), 0).sum() / n_causal).sqrt(),
                         gate_mean_sigmoid=torch.where(causal, torch.sigmoid(s / self.tau), 0).sum() / n_causal,
                         gate_oracle_f1=((picked & oracle).sum(-1) / oracle.sum(-1))[..., rows].mean())
        self._stats = stats

    def metrics(self) -> dict[str, float]:
        """The last tracked forward's statistics (``_measure``; none until ``track_stats`` is set),
        and, with a gate, the rms of its weights A and B (always; cheap)."""
        out = {name: float(value) for name, value in self._stats.items()}
        if self.gate in ("learned", "random"):
            w = torch.cat([self.gate_q.weight.detach().flatten(), self.gate_k.weight.detach().flatten()]).float()
            out["gate_weight_rms"] = float(w.pow(2).mean().sqrt())
        return out

    def extra_flops_per_token(self, seq_len: int) -> float:
        """Scores and weighted sum (4 d per attended key: (seq_len + 1) / 2 keys on average, or the
        mean of min(k, i + 1) in hard mode), plus the gate's scoring (2 H r per causal key). This
        counts the training path; the nn.Linears (A and B included) are counted by the model."""
        context = (seq_len + 1) / 2
        d = self.n_head * self.head_dim
        if self.block is not None:
            gated = self.gate != "none"
            path = self.mode if gated else "dense"
            width = gate_feature_width(self.gate, self.head_dim, self.rank)
            gate = self.block.gate_flops_per_token(seq_len, self.n_head, width) if gated else 0.0
            return 4.0 * d * self.block.attended_keys(seq_len, path) + gate
        if self.gate == "none":
            return 4.0 * d * context
        kept = sum(min(self.k, i + 1) for i in range(seq_len)) / seq_len if self.mode == "hard" else context
        return 4.0 * d * kept + 2.0 * self.n_head * self.rank * context

    def state_size(self, seq_len: int | None = None) -> int:
        """Floats per sequence: the KV cache and, with a learned or random gate, its keys B x_j (H r per
        token); at block granularity also the gate's query features (moba's are q: H Dh per token)."""
        length = seq_len if seq_len is not None else self.max_seq_len
        gate = self.n_head * self.rank if self.gate in ("learned", "random") else 0
        if self.block is not None and self.gate != "none":
            gate += self.n_head * gate_feature_width(self.gate, self.head_dim, self.rank)
        return (2 * self.n_head * self.head_dim + gate) * length


def _block_routing(owner: str, spec: LayerSpec, block_size, top_k_blocks, block_form, tau, **token_options) -> BlockRouting:
    """The block options, checked; the token-only options must be at their defaults."""
    given = [name for name, value in token_options.items()
             if value != {"k": None, "hard_form": "gather", "mask_randomisation": 0.0}[name]]
    if given:
        raise ConfigError(f"{owner}: {', '.join(given)} apply to granularity 'token' (blocks take block_size, "
                          f"top_k_blocks and block_form)")
    block_size = check_int(owner, "block_size", block_size)
    n = -(-spec.max_seq_len // block_size)
    top_k_blocks = max(1, n // 8) if top_k_blocks is None else check_int(owner, "top_k_blocks", top_k_blocks, low=0)
    return BlockRouting(block_size, top_k_blocks, check_choice(owner, "block_form", block_form, BLOCK_FORMS), tau)


def _top_k_row(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """scores [..., n] (one query's causal keys) -> bool [..., n]: its top_k keys, ties to the lower
    key index (a stable descending sort, the ops' rule)."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :top_k]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, order, True)
