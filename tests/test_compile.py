"""Every registered layer in a TransformerLM, the ViT with each prompt method (and RwF's generator),
and step() decoding, under ``torch.compile(fullgraph=True)``: a graph break is a failure, and the
compiled model's outputs and every gradient equal eager's.

Parametrised over the registries (``routemem.layers.VARIANTS``): a new mixer, FFN or mode is covered
by registering it. Each layer's default configuration compiles with Inductor (its C++ backend here,
Triton on CUDA), as do the plain ViT, RwF and decoding; the other variants and prompt methods
compile with ``aot_eager``, which traces the same graph (dynamo, the ops' fakes, AOT autograd)
without generating code, to keep the suite fast on two cores. Shapes are tiny and one model is
compiled per case. Tolerance: each tensor's max error within COMPILE_RTOL of its
own largest value (float32; Inductor reorders sums and fuses the elementwise work).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from devices import HAS_CUDA, NO_CUDA
from op_checks import CPU_ONLY_MODES, GPU_MODES, HAS_COMPILER
from torch._dynamo.utils import counters

from routemem.layers import FFNS, MIXERS, VARIANTS
from routemem.layers.hopfield_prompts import HopfieldPromptGenerator
from routemem.layers.prompts import L2P, CodaPrompt, DualPrompt
from routemem.models import TransformerLM
from routemem.models.config import LMConfig
from routemem.models.vit import VisionTransformer, ViTConfig

COMPILE_RTOL = 1e-4
SHAPE = dict(vocab_size=32, n_layer=1, d_model=32, n_head=2, max_seq_len=8)
BATCH = 2


def _cases(kind: str, table: dict) -> list:
    cases = []
    for name in sorted(table):
        for variant, kwargs in VARIANTS[kind][name].items():
            for device in ("cpu", "cuda"):
                cpu_only = kwargs.get("mode") in CPU_ONLY_MODES
                if device == "cuda" and cpu_only:
                    continue  # a CPU kernel: the mode is not offered on CUDA
                if device == "cpu" and kwargs.get("mode") in GPU_MODES:
                    continue  # Triton kernels compile for a GPU (a triton_op cannot be compiled here)
                marks = []
                if device == "cuda":
                    marks = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA)]
                elif (cpu_only or kwargs.get("mode") == "auto") and not HAS_COMPILER:
                    marks = [pytest.mark.skip(reason="no C++ compiler")]
                cases.append(pytest.param(name, variant, kwargs, device, marks=marks,
                                          id=f"{name}-{variant}-{device}".replace(" ", "_")))
    return cases


def _run(call, model, inputs) -> dict[str, torch.Tensor]:
    """Logits, loss and the gradient of every parameter of ``model`` after ``call``'s loss.backward()
    (``call``: the model or its compiled form, which shares its parameters). ``inputs``: token ids
    [B, T] (the targets are the next tokens) or a tuple of arguments."""
    model.zero_grad(set_to_none=True)
    args = inputs if isinstance(inputs, tuple) else (inputs, inputs.roll(-1, dims=1))
    logits, loss = call(*args)
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


# -- the ViT, plain and with each prompt method ------------------------------------------------

VIT = dict(image_size=8, patch_size=4, in_chans=1, d_model=16, n_layer=3, n_head=2, mlp_hidden=32, n_classes=5)


def _prompt_module(method: str):
    D, L = VIT["d_model"], VIT["n_layer"]
    return {"plain": lambda: None,
            "l2p": lambda: L2P(D, pool_size=4, length=2, top_n=2),
            "dualprompt": lambda: DualPrompt(D, L, pool_size=4),
            "coda": lambda: CodaPrompt(D, L, n_tasks=2, ortho_mu=0.1),
            "rwf": lambda: HopfieldPromptGenerator(D, L, length=4),
            "rwf prefix": lambda: HopfieldPromptGenerator(D, L, length=4, insertion="prefix")}[method]()


class PromptedViT(torch.nn.Module):
    """A training step's loss: the prompt module's prompts from a query, the ViT with them, the
    cross-entropy plus the module's auxiliary loss (as the continual-learning learners run it)."""

    def __init__(self, method: str):
        super().__init__()
        self.vit = VisionTransformer(ViTConfig(**VIT))
        self.prompt = _prompt_module(method)

    def forward(self, images, query, labels):
        if self.prompt is None:
            logits, aux = self.vit(images), 0.0
        else:
            prompts, aux = self.prompt(query)
            logits = self.vit(images, prompts=prompts, pool=self.prompt.pool)
        return logits, F.cross_entropy(logits, labels) + aux


@pytest.mark.parametrize("method", ["plain", "l2p", "dualprompt", "coda", "rwf", "rwf prefix"])
def test_vit_with_each_prompt_method_compiles_whole(method, device):
    torch.manual_seed(0)
    model = PromptedViT(method).to(device).train()
    g = torch.Generator().manual_seed(0)
    inputs = (torch.rand(3, 1, 8, 8, generator=g), F.normalize(torch.randn(3, VIT["d_model"], generator=g), dim=-1),
              torch.randint(0, VIT["n_classes"], (3,), generator=g))
    inputs = tuple(x.to(device) for x in inputs)
    backend = "inductor" if method in ("plain", "rwf") else "aot_eager"  # see the module docstring
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    assert_same(_run(compiled, model, inputs), _run(model, model, inputs))


# -- decoding one token at a time ---------------------------------------------------------------

@pytest.mark.parametrize("mixer", ["attention", "palimpsa"])
def test_step_decoding_compiles_whole(mixer, device):
    """Each mixer's step() under compile, equal to eager step by step and to the parallel forward.
    The cache changes every step (its position; attention's keys grow), so dynamo's automatic
    dynamic shapes must settle on a few graphs, not one per position."""
    torch.manual_seed(0)
    model = TransformerLM(LMConfig(**SHAPE, mixer=mixer)).to(device).eval()
    tokens = torch.randint(0, SHAPE["vocab_size"], (BATCH, 8)).to(device)
    counters.clear()
    step = torch.compile(model.step, fullgraph=True)
    eager_cache = compiled_cache = None
    for t in range(tokens.shape[1]):
        want, eager_cache = model.step(tokens[:, t], eager_cache)
        got, compiled_cache = step(tokens[:, t], compiled_cache)
        assert_same({"logits": got}, {"logits": want})
    assert counters["stats"]["unique_graphs"] <= 3  # no cache, the first cache, then any position
    with torch.no_grad():
        assert_same({"logits": got}, {"logits": model(tokens)[:, -1]})
