"""Fast-slow coupled attention: the ``fast_slow`` mixer against the plain ``attention`` mixer with
the same width and heads; time and memory, forward alone and forward+backward, at T in
{256, 1024, 4096} (16384 too on a GPU) and block P in {4, 16}.

The gate is opened (every entry set to GATE_OPEN) before timing. With the gate at its zero init
the layer computes the slow path all the same, but the point is its cost in use, once the gate
has opened; the timed work is identical either way, only the output differs.

Targets (issue 11, the paper's "wall-clock comparable to dense"): fast_slow time / attention time
<= 1.1 at P=16 for T=1024 and T=4096, each for fwd and for fwd+bwd (four targets). A quick run
measures T=1024 only, so its T=4096 targets are reported as not judged.

Each T builds both mixers once; ROUNDS rounds then time every variant (attention, fast_slow at each
P) in turn, REPEATS calls each after one warm-up, so that drift in machine load hits all of them
alike; the median is over every round's runs. fwd runs under torch.no_grad; fwd+bwd backpropagates
a fixed random output gradient into the input and every parameter.

Under ``--compile`` each mixer is timed through ``torch.compile(module, fullgraph=True)``, compiled
afresh per T (static shapes) in an untimed first call per direction (its seconds in
``info["compile_s"]``); a mixer that does not compile gets skipped rows with the reason.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from routemem.bench.common import (
    FWD,
    FWD_BWD,
    all_met,
    backward_memory,
    first_call,
    interleaved_runs,
    maybe_compile,
    memory_measure,
    row,
    target,
    timed_call,
)
from routemem.layers import LayerSpec, build_mixer

SHAPE = {"B": 4, "d_model": 128, "n_head": 4}
GATE_OPEN = 0.1  # every gate entry while timing (the layer in use; see the module docstring)
# a GPU runs the long lengths in milliseconds, so its full run adds one
LENGTHS = {"quick": (256, 1024), "full": (256, 1024, 4096), "full_cuda": (256, 1024, 4096, 16384)}
BLOCKS = {"quick": (16,), "full": (4, 16)}
TARGET_BLOCK = 16
TARGET_LENGTHS = (1024, 4096)
RATIO_TARGET = 1.1  # fast_slow time / attention time, at most
ROUNDS = {"quick": 1, "full": 3}
REPEATS = {"quick": 2, "full": 3}
SEED = 0

ATTENTION, FAST_SLOW = "attention", "fast_slow"  # a row's "op"; the modes are "causal" and "coupled"


def _build(T: int, blocks: tuple[int, ...], device: torch.device) -> dict:
    """attention and fast_slow at each block size, gates opened. Each is built from the same seed, so
    fast_slow's fast path (built first) has the attention mixer's weights."""
    spec = LayerSpec(d_model=SHAPE["d_model"], n_head=SHAPE["n_head"], max_seq_len=T)
    modules = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        modules[ATTENTION, None] = build_mixer("attention", spec)
        for P in blocks:
            torch.manual_seed(SEED)
            layer = build_mixer("fast_slow", spec, {"block": P})
            with torch.no_grad():
                layer.gate.fill_(GATE_OPEN)
            modules[FAST_SLOW, P] = layer
    for module in modules.values():
        module.to(device).train()
    return modules


def make_input(T: int, device: torch.device, seed: int = SEED) -> torch.Tensor:
    """[B, T, d_model] unit-scale tokens, as a block's pre-mixer norm hands them over."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE["B"], T, SHAPE["d_model"], generator=g)
    return F.layer_norm(x, (SHAPE["d_model"],)).to(device)


def _once(module: torch.nn.Module, x: torch.Tensor, backward: bool, grad: torch.Tensor):
    leaf = x.detach().requires_grad_(backward)
    return timed_call(lambda: module(leaf), backward, [leaf, *module.parameters()], lambda out: out.backward(grad))


def _memory(module: torch.nn.Module, x: torch.Tensor, backward: bool, grad: torch.Tensor) -> int | None:
    leaf = x.detach().requires_grad_()
    return backward_memory(_once(module, x, backward, grad), lambda: module(leaf), [leaf, *module.parameters()],
                           backward, x.device)


def _label(op: str, P: int | None) -> str:
    return ATTENTION if P is None else f"{op}_P{P}"


def _n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def run(quick: bool = False, device: torch.device | str = "cpu", compile: bool = False) -> dict:
    device = torch.device(device)
    key = "quick" if quick else "full"
    lengths = LENGTHS["quick" if quick else "full_cuda" if device.type == "cuda" else "full"]
    blocks = BLOCKS[key]
    directions = ((FWD, False), (FWD_BWD, True))
    rows, params, compile_s = [], {}, {}
    for T in lengths:
        x = make_input(T, device)
        grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(SEED + 1)).to(device)
        modules = _build(T, blocks, device)
        if compile:
            torch._dynamo.reset()  # this length compiles afresh: static shapes, no recompile limit
        called = {name: maybe_compile(module, compile) for name, module in modules.items()}
        skipped = {}  # (name, direction) -> why, for a mixer that does not compile
        if compile:  # the compiles, untimed, before the rounds
            for name, module in called.items():
                for direction, backward in directions:
                    took, why = first_call(_once(module, x, backward, grad), device)
                    if why:
                        skipped[name, direction] = why
                    else:
                        compile_s[f"{_label(*name)}/{direction}/T{T}"] = took
        runs = interleaved_runs({(name, direction): (_once(module, x, backward, grad), REPEATS[key])
                                 for name, module in called.items() for direction, backward in directions
                                 if (name, direction) not in skipped},
                                ROUNDS[key], device=device)
        for (op, P), module in called.items():
            names = {"op": op, "mode": "causal" if op == ATTENTION else "coupled", "T": T, "P": P, **SHAPE}
            for direction, backward in directions:
                if ((op, P), direction) in skipped:
                    rows.append(row(names, direction, skipped=skipped[(op, P), direction]))
                    continue
                rows.append(row(names, direction, runs[(op, P), direction], _memory(module, x, backward, grad),
                                memory_measure(device)))
        params = {_label(op, P): _n_params(m) for (op, P), m in modules.items()}
        del modules, called, x, grad

    info = {
        "setup": {**SHAPE, "gate": "vector", "gate_value": GATE_OPEN, "slow_heads": SHAPE["n_head"],
                  "pos": "learned (no RoPE)", "dropout": 0.0, "dtype": "float32", "blocks": list(blocks),
                  "lengths": list(lengths),
                  "timed": "one mixer call on [B, T, d_model]; fwd under torch.no_grad; fwd+bwd backpropagates "
                           "a fixed random output gradient into the input and all parameters",
                  "rounds": ROUNDS[key], "repeats_per_round": REPEATS[key], "warmup": 1},
        "params": params,
    }
    if compile:
        info["compile_s"] = compile_s
    targets = _targets(rows)
    return {"rows": rows, "targets": targets, "all_targets_met": all_met(targets), "info": info}


def _targets(rows: list[dict]) -> list[dict]:
    """fast_slow at P=TARGET_BLOCK over attention at the same T, per target length and direction."""
    found = []
    for T in TARGET_LENGTHS:
        for direction in (FWD, FWD_BWD):
            tag = direction.replace("+", "_")  # fwd | fwd_bwd, for a plain identifier
            found.append(target(
                rows, f"fast_slow_P{TARGET_BLOCK}_over_attention_T{T}_{tag}",
                f"the fast_slow mixer (P={TARGET_BLOCK}, gate open) at most {RATIO_TARGET:g}x the time of the "
                f"attention mixer with the same width and heads (T={T}, {direction})",
                {"op": FAST_SLOW, "P": TARGET_BLOCK, "T": T, "direction": direction},
                {"op": ATTENTION, "T": T, "direction": direction},
                RATIO_TARGET, "<="))
    return found
