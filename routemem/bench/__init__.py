"""Benchmark suites for ``routemem bench <suite> [--device auto|cpu|cuda]``.

Every suite reports one JSON shape: ``suite``, ``env`` (the machine header), ``quick``, ``rows``
(one flat record per measurement), ``targets`` (ratio, threshold, comparison, met) and
``all_targets_met``, plus suite-specific context under ``info``. ``env["compile"]`` says whether
the suite ran under ``--compile`` (its modules and ops timed through ``torch.compile``). Each row
names what it measured and its timing statistics; each target compares a ratio of two rows with
its threshold (``met`` says whether it holds). Every field and how targets are judged are documented in full in
docs/benchmarks.md of the source repository (a wheel does not ship docs/).

The suites are imported when run, so listing them (``routemem bench --help``) stays cheap. A suite
``a-b`` lives in the module ``routemem.bench.a_b``.
"""

from __future__ import annotations

import importlib

# name -> what it measures, in a few words (``routemem bench --help`` prints these)
SUITES: dict[str, str] = {
    "train": "Trainer.fit tokens/s against a minimal hand-written training loop (overhead <= 10%); "
             "compiled vs eager training steps of four mechanisms",
    "palimpsa": "metaplastic attention chunk/fused vs its reference loop, GLA, gated delta and SDPA",
    "apn": "Attractor Patch FFN grouped/fused/grouped_mm vs reference, and vs a same-parameter dense FFN",
    "fast-slow": "fast_slow mixer (gate open, P=4/16) vs the plain attention mixer, T=256..4096",
    "sparse": "hard top-k gated attention (fast form, gate's cost included) vs dense causal SDPA, T=1024, 4096",
    "vit": "the small ViT's images/s, fwd and fwd+bwd, plain and with L2P / DualPrompt / CODA-Prompt prompts",
    "kernels": "GPU only: metaplastic Triton kernel vs its chunk form, fla's chunk_gla / gated delta, our GLA, SDPA (bf16, 16k tokens)",
}


def run_suite(name: str, quick: bool = False, out: str | None = None, device: str = "auto",
              compile: bool = False) -> dict:
    """Run suite ``name`` on ``device`` (auto | cpu | cuda, or a torch.device); the result dict,
    also written atomically to ``out`` when given. ``compile``: the suite times its modules and ops
    through ``torch.compile(fullgraph=True)`` (``routemem bench --compile``; a form that does not
    compile is a skipped row saying why); ``env["compile"]`` records it."""
    import inspect

    from routemem.bench.common import compile_budget, write_json
    from routemem.errors import UserError
    from routemem.machine import machine_header, resolve_device

    if name not in SUITES:
        raise UserError(f"unknown benchmark suite '{name}' (available: {', '.join(sorted(SUITES))})")
    resolved = resolve_device(device)
    module = importlib.import_module(f"routemem.bench.{name.replace('-', '_')}")  # fast-slow -> fast_slow
    options = {}
    if "compile" in inspect.signature(module.run).parameters:
        options["compile"] = bool(compile)
    elif compile:
        raise UserError(f"benchmark suite '{name}' does not take --compile yet")
    with compile_budget(compile):
        measured = module.run(quick=quick, device=resolved, **options)
    result = {"suite": name, "env": {**machine_header(resolved), "compile": bool(compile)}, "quick": quick,
              "rows": measured["rows"], "targets": measured["targets"],
              "all_targets_met": measured["all_targets_met"], "info": measured.get("info", {})}
    if out:
        write_json(out, result)
    return result

