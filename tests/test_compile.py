"""Every registered layer under ``torch.compile(fullgraph=True)``: a graph break is a failure, and
the compiled model's outputs and every gradient equal eager's.

Parametrised over the registries (``routemem.layers.VARIANTS``): a new mixer, FFN or mode is covered
by registering it. Each layer's default configuration compiles with Inductor (its C++ backend here,
Triton on CUDA); its other variants with ``aot_eager``, which traces the same graph (dynamo, the ops'
fakes, AOT autograd) without generating code, to keep the suite fast on two cores. Shapes are tiny
and one model is compiled per case. Tolerance: each tensor's max error within COMPILE_RTOL of its
own largest value (float32; Inductor reorders sums and fuses the elementwise work).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from devices import HAS_CUDA, NO_CUDA
from op_checks import CPU_ONLY_MODES, HAS_COMPILER

from routemem.layers import FFNS, MIXERS, VARIANTS
from routemem.models import TransformerLM
from routemem.models.config import LMConfig

COMPILE_RTOL = 1e-4
SHAPE = dict(vocab_size=32, n_layer=1, d_model=32, n_head=2, max_seq_len=16)
BATCH = 2


def _cases(kind: str, table: dict) -> list:
    cases = []
    for name in sorted(table):
        for variant, kwargs in VARIANTS[kind][name].items():
            for device in ("cpu", "cuda"):
                cpu_only = kwargs.get("mode") in CPU_ONLY_MODES
                if device == "cuda" and cpu_only:
                    continue  # a CPU kernel: the mode is not offered on CUDA
                marks = []
                if device == "cuda":
                    marks = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA)]
                elif (cpu_only or kwargs.get("mode") == "auto") and not HAS_COMPILER:
                    marks = [pytest.mark.skip(reason="no C++ compiler")]
                cases.append(pytest.param(name, variant, kwargs, device, marks=marks,
                                          id=f"{name}-{variant}-{device}".replace(" ", "_")))
    return cases


def _run(call, model, idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """Logits, loss and the gradient of every parameter of ``model`` after ``call``'s loss.backward()
    (``call``: the model or its compiled form, which shares its parameters)."""
    model.zero_grad(set_to_none=True)
    logits, loss = call(idx, idx.roll(-1, dims=1))
    loss.backward()
    out = {"logits": logits.detach(), "loss": loss.detach()}
    out.update({f"grad {n}": p.grad for n, p in model.named_parameters() if p.requires_grad})
    return out


def assert_same(compiled: dict, eager: dict, rtol: float = COMPILE_RTOL) -> None:
    assert compiled.keys() == eager.keys()
    for name, want in eager.items():
        got = compiled[name]
        assert (got is None) == (want is None), f"{name}: a gradient on one side only"
        if want is None:
            continue
        err = (got.float() - want.float()).abs().max().item()
        assert err <= rtol * max(want.abs().max().item(), 1e-6), f"{name}: max error {err:.3g}"


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each case compiles its own model: without a reset, dynamo's per-function recompile limit
    (8 graphs for TransformerLM.forward) would be spent by the earlier cases."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _check_lm(config: LMConfig, variant: str, device: str) -> None:
    torch.manual_seed(0)
    model = TransformerLM(config).to(device).train()
    idx = torch.randint(0, config.vocab_size, (BATCH, config.max_seq_len)).to(device)
    backend = "inductor" if variant == "default" else "aot_eager"
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    # Layers that draw random numbers in training (mask randomisation) draw from the same stream
    # in both runs: the seed is reset before each.
    torch.manual_seed(1)
    eager = _run(model, model, idx)
    torch.manual_seed(1)
    assert_same(_run(compiled, model, idx), eager)


@pytest.mark.parametrize("name, variant, kwargs, device", _cases("mixer", MIXERS))
def test_lm_with_each_mixer_compiles_whole(name, variant, kwargs, device):
    _check_lm(LMConfig(**SHAPE, mixer=name, mixer_kwargs=kwargs), variant, device)


@pytest.mark.parametrize("name, variant, kwargs, device", _cases("ffn", FFNS))
def test_lm_with_each_ffn_compiles_whole(name, variant, kwargs, device):
    _check_lm(LMConfig(**SHAPE, ffn=name, ffn_kwargs=kwargs), variant, device)
