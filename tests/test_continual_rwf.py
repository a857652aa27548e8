"""The ``rwf`` continual method: registered, runs a tiny 3-task online stream end to end with either
insertion, keeps the backbone frozen while the generator and head learn, trains what ``train``
says, and needs no frozen-query pass."""

import numpy as np
import pytest
import torch

from routemem.data import make_imageset, make_stream
from routemem.errors import ConfigError
from routemem.models import VisionTransformer, ViTConfig
from routemem.train.continual import (
    list_methods,
    make_method,
    method_options,
    run_stream,
)

N_CLASSES, N_TASKS = 6, 3


def tiny_vit() -> VisionTransformer:
    return VisionTransformer(ViTConfig(image_size=8, patch_size=4, in_chans=1, d_model=32, n_layer=2, n_head=4,
                                       mlp_hidden=48, n_classes=5))


@pytest.fixture(scope="module")
def stream():
    rng = np.random.default_rng(0)
    protos = (rng.random((N_CLASSES, 1, 8, 8)) < 0.5).astype(np.float32)
    labels = np.repeat(np.arange(N_CLASSES), 10)
    images = np.clip(protos[labels] + 0.05 * rng.standard_normal((len(labels), 1, 8, 8)), 0, 1).astype(np.float32)
    imageset = make_imageset("patterns", images, labels, [f"c{i}" for i in range(N_CLASSES)])
    return make_stream(imageset, N_TASKS, batch_size=10, seed=0)


def test_rwf_is_registered_with_its_defaults():
    assert "rwf" in list_methods() and "\n" not in list_methods()["rwf"]
    assert method_options("rwf") == {"lr": 1e-3, "train_mask": "task", "layers": None, "length": 10, "heads": 1,
                                     "head_dim": None, "beta": None, "steps": 1, "insertion": "prompt",
                                     "norms": True, "train": "all", "retrieval": True}
    method = make_method("rwf", tiny_vit(), N_CLASSES, N_TASKS)
    assert method.prompt.layers == (0,) and method.rebuild_optimizer_each_task and method.frozen_backbone


@pytest.mark.parametrize("options", [{"insertion": "prompt"}, {"insertion": "prefix"}, {"retrieval": False}],
                         ids=["prompt", "prefix", "static"])
def test_rwf_runs_a_stream_end_to_end_with_the_backbone_frozen(stream, options):
    vit = tiny_vit()
    original = [p.detach().clone() for p in vit.parameters()]
    method = make_method("rwf", vit, N_CLASSES, N_TASKS, layers=[0, 1], length=4, **options)
    backbone = [p.detach().clone() for p in method.vit.backbone_parameters()]
    generator = [p.detach().clone() for p in method.prompt.parameters()]
    head = method.vit.head.weight.detach().clone()
    result = run_stream(method, stream, device="cpu", eval_every=20)
    R = result["accuracy_matrix"]
    assert np.isfinite(R[np.tril_indices(N_TASKS)]).all() and np.isnan(R[np.triu_indices(N_TASKS, 1)]).all()
    assert all(np.isfinite(v) for v in result["metrics"].values())
    assert result["method"] == "rwf" and result["updates"] == stream.n_batches
    assert all(torch.equal(a, b) for a, b in zip(backbone, method.vit.backbone_parameters()))
    assert not any(p.requires_grad for p in method.vit.backbone_parameters())
    assert all(not torch.equal(a, b) for a, b in zip(generator, method.prompt.parameters()))  # every part learns
    assert not torch.equal(head, method.vit.head.weight)
    assert all(torch.equal(a, b) for a, b in zip(original, vit.parameters()))  # the caller's backbone


@pytest.mark.parametrize("train, trains", [("all", None), ("queries", {"state_patterns"}),
                                           ("output", {"out_proj.weight", "out_proj.bias"})])
def test_rwf_trains_the_head_and_what_train_names(train, trains):
    method = make_method("rwf", tiny_vit(), N_CLASSES, N_TASKS, train=train)
    method.begin_task(0, [0, 1])
    optimized = {id(p) for group in method.optimizer.param_groups for p in group["params"]}
    named = dict(method.prompt.blocks["0"].named_parameters())
    expected = set(named) if trains is None else trains
    assert optimized == {id(p) for p in method.vit.head.parameters()} | {id(named[n]) for n in expected}


def test_rwf_uses_no_frozen_query_pass():
    method = make_method("rwf", tiny_vit(), N_CLASSES, N_TASKS)
    calls = []
    forward = method.vit.forward
    method.vit.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    method.query = lambda images: pytest.fail("rwf should not compute the frozen CLS query")
    method.begin_task(0, [0, 1])
    method.observe(torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 0, 1]))
    assert len(calls) == 1  # one prompted forward per update


def test_rwf_without_prompted_blocks_is_a_linear_probe():
    vit = tiny_vit()
    method = make_method("rwf", vit, N_CLASSES, N_TASKS, layers=[])
    images = torch.rand(4, 1, 8, 8)
    method.seen[:] = True
    with torch.no_grad():
        torch.testing.assert_close(method.predict(images), method.vit.head(method.vit.features(images)), rtol=0, atol=0)
    assert {id(p) for p in method.trainable_parameters()} == {id(p) for p in method.vit.head.parameters()}


@pytest.mark.parametrize("options, message", [
    ({"train": "keys"}, "train must be one of"),
    ({"insertion": "prefix", "length": 5}, "length must be even"),
    ({"layers": [2]}, "layers must be distinct ints in 0..1"),
    ({"pool": 3}, "has no option 'pool'"),
])
def test_bad_rwf_settings_are_config_errors(options, message):
    with pytest.raises(ConfigError, match=message):
        make_method("rwf", tiny_vit(), N_CLASSES, N_TASKS, **options)
