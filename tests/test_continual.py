"""The online class-incremental loop and its methods (the six baselines and rwf), on tiny ViTs and synthetic image sets."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from routemem.data import make_imageset, make_stream, to_rgb
from routemem.errors import ConfigError, DataError
from routemem.models import VisionTransformer, ViTConfig
from routemem.train.continual import (
    METHODS,
    list_methods,
    make_method,
    method_options,
    result_to_json,
    run_stream,
)
from routemem.train.continual.methods import LinearProbe
from routemem.train.continual.replay import ReservoirBuffer

N_CLASSES, N_TASKS = 6, 3
FROZEN = ("linear-probe", "l2p", "dualprompt", "coda-prompt", "rwf")


def tiny_vit(n_classes=5) -> VisionTransformer:
    return VisionTransformer(ViTConfig(image_size=8, patch_size=4, in_chans=1, d_model=32, n_layer=2, n_head=4,
                                       mlp_hidden=48, n_classes=n_classes))


def pattern_set(n_classes=N_CLASSES, per_class=20, seed=0, noise=0.05):
    """Each class a fixed random binary 8x8 pattern, each sample that pattern plus a little noise."""
    rng = np.random.default_rng(seed)
    protos = (rng.random((n_classes, 1, 8, 8)) < 0.5).astype(np.float32)
    labels = np.repeat(np.arange(n_classes), per_class)
    images = np.clip(protos[labels] + noise * rng.standard_normal((len(labels), 1, 8, 8)), 0, 1)
    return make_imageset("patterns", images.astype(np.float32), labels, [f"c{i}" for i in range(n_classes)])


@pytest.fixture(scope="module")
def stream():
    return make_stream(pattern_set(), N_TASKS, batch_size=10, seed=0)


def run(name, stream, seed=0, vit=None, **kwargs):
    options = kwargs.pop("options", {})
    method = make_method(name, vit or tiny_vit(), N_CLASSES, N_TASKS, seed=seed, **options)
    return method, run_stream(method, stream, device="cpu", seed=seed, **kwargs)


def backbone_state(method):
    return [p.detach().clone() for p in method.vit.backbone_parameters()]


# --- the loop, every method ---------------------------------------------------------------------


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_runs_a_stream_and_fills_the_accuracy_matrix(name, stream):
    _, result = run(name, stream, eval_every=25)
    R = result["accuracy_matrix"]
    lower = np.tril_indices(N_TASKS)
    assert R.shape == (N_TASKS, N_TASKS)
    assert np.isfinite(R[lower]).all() and ((R[lower] >= 0) & (R[lower] <= 1)).all()
    assert np.isnan(R[np.triu_indices(N_TASKS, 1)]).all()  # tasks not yet trained on: not measured
    expected_batches, expected_samples = stream.anytime_points(25)
    np.testing.assert_array_equal(result["anytime_samples"], expected_samples)
    assert len(result["anytime_accuracy"]) == len(expected_batches)
    assert ((result["anytime_accuracy"] >= 0) & (result["anytime_accuracy"] <= 1)).all()
    metrics = result["metrics"]
    assert set(metrics) == {"final_average_accuracy", "average_incremental_accuracy", "forgetting",
                            "backward_transfer", "a_auc"}
    assert all(np.isfinite(v) for v in metrics.values())
    assert metrics["final_average_accuracy"] == pytest.approx(R[-1].mean())
    assert result["updates"] == stream.n_batches and result["samples"] == len(stream)
    assert result["method"] == name and result["options"] == method_options(name)
    assert result["train_images_per_second"] > 0
    json.dumps(result_to_json(result), allow_nan=False)  # results files get plain JSON


@pytest.mark.parametrize("name", list(METHODS))
def test_prediction_never_picks_a_class_not_yet_seen(name, stream):
    method = make_method(name, tiny_vit(), N_CLASSES, N_TASKS)
    everything = torch.from_numpy(stream.images.images)
    assert torch.isneginf(method.predict(everything)).all()  # nothing seen yet
    method.begin_task(0, stream.tasks[0].classes)
    first = stream.batch(0)
    method.observe(torch.from_numpy(stream.images.images[first.indices]),
                   torch.from_numpy(stream.images.labels[first.indices]))
    seen = np.unique(stream.images.labels[first.indices])
    logits = method.predict(everything)
    unseen = np.setdiff1d(np.arange(N_CLASSES), seen)
    assert len(unseen) and torch.isneginf(logits[:, unseen]).all()
    assert torch.isfinite(logits[:, seen]).all()
    assert set(logits.argmax(1).tolist()) <= set(seen.tolist())


def test_logits_of_unseen_classes_get_no_training_signal(stream):
    method = make_method("linear-probe", tiny_vit(), N_CLASSES, N_TASKS)
    head0 = method.vit.head.weight.detach().clone()
    for b in range(stream.task_end_batches()[0] + 1):
        batch = stream.batch(b)
        if b == 0:
            method.begin_task(0, stream.tasks[0].classes)
        method.observe(torch.from_numpy(stream.images.images[batch.indices]),
                       torch.from_numpy(stream.images.labels[batch.indices]))
    later = np.concatenate([t.classes for t in stream.tasks[1:]])
    first = stream.tasks[0].classes
    assert torch.equal(method.vit.head.weight[later], head0[later])
    assert not torch.equal(method.vit.head.weight[first], head0[first])


@pytest.mark.parametrize("train_mask, earlier_rows_move", [("task", False), ("seen", True)])
def test_task_mask_keeps_earlier_tasks_out_of_the_loss(stream, train_mask, earlier_rows_move):
    method = make_method("l2p", tiny_vit(), N_CLASSES, N_TASKS, train_mask=train_mask)
    ends = stream.task_end_batches()
    images, labels = torch.from_numpy(stream.images.images), torch.from_numpy(stream.images.labels)
    for b in range(ends[1] + 1):
        batch = stream.batch(b)
        if batch.task != method.task:
            method.begin_task(batch.task, stream.tasks[batch.task].classes)
        if b == ends[0] + 1:  # task 1's first batch: snapshot task 0's head rows
            rows = method.vit.head.weight[stream.tasks[0].classes].detach().clone()
        method.observe(images[batch.indices], labels[batch.indices])
    moved = not torch.equal(method.vit.head.weight[stream.tasks[0].classes], rows)
    assert moved == earlier_rows_move


@pytest.mark.parametrize("name", list(METHODS))
def test_frozen_backbones_stay_frozen_and_the_callers_backbone_is_never_touched(name, stream):
    vit = tiny_vit()
    original = [p.detach().clone() for p in vit.parameters()]
    method = make_method(name, vit, N_CLASSES, N_TASKS)
    before = backbone_state(method)
    run_stream(method, stream, device="cpu")
    changed = [not torch.equal(a, b) for a, b in zip(before, backbone_state(method))]
    if name in FROZEN:
        assert not any(changed)
        assert not any(p.requires_grad for p in method.vit.backbone_parameters())
    else:
        assert any(changed)
    assert all(torch.equal(a, b) for a, b in zip(original, vit.parameters()))
    assert vit.config.n_classes == 5 and method.vit.head.out_features == N_CLASSES


def test_trainable_parameters_per_method():
    vit = tiny_vit()
    for name in METHODS:
        method = make_method(name, vit, N_CLASSES, N_TASKS)
        head = {id(p) for p in method.vit.head.parameters()}
        trainable = {id(p) for p in method.trainable_parameters()}
        assert head <= trainable
        if name == "linear-probe":
            assert trainable == head
        elif name in FROZEN:
            prompt = {id(p) for p in method.prompt.parameters() if p.requires_grad}
            assert prompt and trainable == head | prompt
        else:
            assert trainable == {id(p) for p in method.vit.parameters()}


# --- updates, order, determinism --------------------------------------------------------------


def test_updates_per_batch_multiplies_the_optimizer_steps(stream):
    for updates in (1, 2):
        method, result = run("linear-probe", stream, updates_per_batch=updates)
        assert result["updates"] == updates * stream.n_batches
        state = method.optimizer.state[method.vit.head.weight]
        assert int(state["step"]) == updates * stream.n_batches  # Adam's own count of its steps


class Recorder(LinearProbe):
    """A linear probe that writes down what the loop hands it."""

    name = "recorder"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def begin_task(self, task, classes):
        self.calls.append(("begin", task, tuple(np.asarray(classes).tolist())))
        super().begin_task(task, classes)

    def observe(self, images, labels):
        self.calls.append(("observe", tuple(torch.round(images[:, 0, 0, 0] * 1000).long().tolist())))
        return super().observe(images, labels)

    def after_batch(self, images, labels):
        self.calls.append(("after",))


@pytest.mark.parametrize("updates", [1, 3])
def test_every_stream_sample_is_observed_once_per_update_round_in_order(updates):
    base = pattern_set(per_class=12)
    stamped = base.images.copy()
    stamped[:, 0, 0, 0] = np.arange(len(base)) / 1000  # each image carries its own index
    images = make_imageset("stamped", stamped, base.labels, base.class_names)
    s = make_stream(images, N_TASKS, batch_size=7, seed=4)
    method = Recorder(tiny_vit(), N_CLASSES, N_TASKS)
    run_stream(method, s, device="cpu", updates_per_batch=updates)
    expected, current = [], None
    for b in s.batches():
        if b.task != current:
            expected.append(("begin", b.task, tuple(s.tasks[b.task].classes.tolist())))
            current = b.task
        expected += [("observe", tuple(b.indices.tolist()))] * updates + [("after",)]
    assert method.calls == expected
    observed = np.concatenate([c[1] for c in method.calls if c[0] == "observe"])
    assert np.array_equal(np.sort(observed), np.sort(np.repeat(s.order, updates)))


def test_same_seed_same_results(stream):
    vit = tiny_vit()  # one backbone, as a study gives every run the same pretrained one
    methods = [make_method("er", vit, N_CLASSES, N_TASKS, seed=3, buffer_size=20) for _ in range(2)]
    first = run_stream(methods[0], stream, device="cpu", seed=3)
    torch.rand(5)  # whatever ran in between: the run seeds its own draws (buffer, replay batches)
    again = run_stream(methods[1], stream, device="cpu", seed=3)
    np.testing.assert_array_equal(first["accuracy_matrix"], again["accuracy_matrix"])
    np.testing.assert_array_equal(first["anytime_accuracy"], again["anytime_accuracy"])


def pretrained_tiny_vit(images, steps=60):
    """A tiny ViT trained on all of ``images`` first, so that its features separate the classes
    (a random tiny ViT's barely do: the linear probe would need hundreds of steps)."""
    vit = tiny_vit(images.n_classes)
    x, y = torch.from_numpy(images.images), torch.from_numpy(images.labels)
    optimizer = torch.optim.Adam(vit.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = F.cross_entropy(vit(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.2  # the premise: the backbone separates the classes
    return vit


def test_linear_probe_learns_an_easy_stream():
    images = pattern_set(n_classes=4, per_class=40, seed=1)
    s = make_stream(images, 2, batch_size=10, seed=1)
    vit = pretrained_tiny_vit(images)
    method = make_method("linear-probe", vit, 4, 2, lr=1e-2)
    result = run_stream(method, s, device="cpu")
    assert result["accuracy_matrix"][0, 0] > 0.9
    assert result["accuracy_matrix"][1, 1] > 0.9


# --- methods in detail ------------------------------------------------------------------------


def test_dualprompt_trains_with_the_current_tasks_expert_and_tests_with_the_key_match(stream):
    method = make_method("dualprompt", tiny_vit(), N_CLASSES, N_TASKS)
    assert method.prompt.keys.shape[0] == N_TASKS  # one expert per task by default
    tasks = []
    forward = method.prompt.forward

    def spy(query, task=None):
        tasks.append((method.training, task))
        return forward(query, task=task)

    method.prompt.forward = spy
    run_stream(method, stream, device="cpu")
    train = [t for training, t in tasks if training]
    expected = [b.task for b in stream.batches()]
    assert train == expected
    assert all(t is None for training, t in tasks if not training)


def test_coda_prompt_adds_components_per_task_and_freezes_the_earlier_ones(stream):
    method = make_method("coda-prompt", tiny_vit(), N_CLASSES, N_TASKS)
    images, labels = torch.from_numpy(stream.images.images), torch.from_numpy(stream.images.labels)
    ends = stream.task_end_batches()
    snapshot = None
    for b in range(stream.n_batches):
        batch = stream.batch(b)
        if batch.task != method.task:
            method.begin_task(batch.task, stream.tasks[batch.task].classes)
            assert method.prompt.task == batch.task
            optimized = {id(p) for group in method.optimizer.param_groups for p in group["params"]}
            assert id(method.prompt.components[batch.task]) in optimized
            assert all(id(method.prompt.components[t]) not in optimized for t in range(N_TASKS) if t != batch.task)
        method.observe(images[batch.indices], labels[batch.indices])
        if b == ends[0]:
            snapshot = method.prompt.components[0].detach().clone()
    assert torch.equal(method.prompt.components[0], snapshot)
    assert not torch.equal(method.prompt.components[N_TASKS - 1], torch.zeros_like(snapshot))


def test_er_replays_an_equal_share_and_buffers_each_sample_once(stream):
    method, _ = run("er", stream, updates_per_batch=2, options={"buffer_size": 30})
    assert method.buffer.n_seen == len(stream) and len(method.buffer) == 30
    mixed = method._training_batch(torch.zeros(10, 1, 8, 8), torch.zeros(10, dtype=torch.long))
    assert len(mixed[1]) == 20


# --- reservoir sampling ------------------------------------------------------------------------


def test_reservoir_never_exceeds_capacity_and_fills_first():
    buffer = ReservoirBuffer(8)
    for n in range(1, 6):
        buffer.add(torch.full((3, 2), float(n)), torch.full((3,), n))
        assert len(buffer) == min(8, 3 * n) and buffer.n_seen == 3 * n
    assert buffer.images.shape == (8, 2)
    assert len(buffer.sample(5)[1]) == 5 and len(buffer.sample(100)[1]) == 8


def test_reservoir_keeps_each_sample_with_probability_capacity_over_n():
    torch.manual_seed(1)
    capacity, n, trials = 10, 100, 400
    counts = np.zeros(n)
    for _ in range(trials):
        buffer = ReservoirBuffer(capacity)
        for lo in range(0, n, 7):  # uneven batches
            ids = torch.arange(lo, min(lo + 7, n))
            buffer.add(ids[:, None].float(), ids)
        counts[buffer.labels.numpy()] += 1
    expected = trials * capacity / n  # 40 per sample
    sd = np.sqrt(trials * (capacity / n) * (1 - capacity / n))  # 6
    assert np.abs(counts - expected).max() < 5 * sd
    # no drift: the first, middle and last thirds are kept equally often
    thirds = [part.mean() for part in np.array_split(counts, 3)]
    assert max(thirds) - min(thirds) < 0.25 * expected


# --- registry and bad input --------------------------------------------------------------------


def test_registry_lists_seven_methods_with_descriptions():
    assert list(list_methods()) == ["linear-probe", "finetune", "er", "l2p", "dualprompt", "coda-prompt", "rwf"]
    assert all(d and "\n" not in d for d in list_methods().values())
    assert method_options("er") == {"lr": 1e-4, "train_mask": "seen", "buffer_size": 500}
    assert method_options("l2p")["lr"] == 1e-3 and method_options("l2p")["train_mask"] == "task"


@pytest.mark.parametrize("name, options, message", [
    ("nope", {}, "unknown method 'nope'"),
    ("l2p", {"pool": 3}, "has no option 'pool'"),
    ("er", {"train_mask": "task"}, "train_mask must be 'seen'"),
    ("finetune", {"train_mask": "all"}, "train_mask must be one of"),
    ("linear-probe", {"lr": 0}, "lr must be"),
    ("dualprompt", {"pool_size": 2}, "below the stream's 3 tasks"),
])
def test_bad_method_settings_are_config_errors(name, options, message):
    with pytest.raises(ConfigError, match=message):
        make_method(name, tiny_vit(), N_CLASSES, N_TASKS, **options)


def test_run_stream_rejects_bad_input(stream):
    method = make_method("linear-probe", tiny_vit(), N_CLASSES, N_TASKS)
    with pytest.raises(ConfigError, match="updates_per_batch"):
        run_stream(method, stream, device="cpu", updates_per_batch=0)
    other = make_method("linear-probe", VisionTransformer(ViTConfig(image_size=16, patch_size=4, d_model=32,
                        n_layer=1, n_head=4, mlp_hidden=32)), N_CLASSES, N_TASKS)
    with pytest.raises(DataError, match="backbone takes"):
        run_stream(other, stream, device="cpu")
    wrong_count = make_method("linear-probe", tiny_vit(), N_CLASSES + 1, N_TASKS)
    with pytest.raises(ConfigError, match="built for 7 classes"):
        run_stream(wrong_count, stream, device="cpu")
    run_stream(method, stream, device="cpu")
    with pytest.raises(ValueError, match="already run"):
        run_stream(method, stream, device="cpu")


def test_run_stream_reads_the_images_it_is_given(stream):
    rgb_vit = VisionTransformer(ViTConfig(image_size=8, patch_size=4, in_chans=3, d_model=32, n_layer=2, n_head=4,
                                          mlp_hidden=48))
    method = make_method("linear-probe", rgb_vit, N_CLASSES, N_TASKS)
    result = run_stream(method, stream, to_rgb(stream.images), device="cpu")  # an RGB backbone, gray stream
    assert np.isfinite(result["accuracy_matrix"][np.tril_indices(N_TASKS)]).all()
    shuffled = make_imageset("other", stream.images.images, stream.images.labels[::-1].copy(),
                             stream.images.class_names)
    with pytest.raises(DataError, match="not the image set the stream indexes"):
        run_stream(make_method("linear-probe", tiny_vit(), N_CLASSES, N_TASKS), stream, shuffled, device="cpu")


@pytest.mark.parametrize("name", ["l2p", "er"])
def test_blurry_streams_run_under_either_mask(name):
    # Si-Blurry-style: a task's batches carry samples of other tasks' classes; "task" masking must
    # still leave every label in the batch unmasked (else the loss would be infinite)
    s = make_stream(pattern_set(per_class=25), N_TASKS, batch_size=10, seed=2, disjoint_share=0.5, blurry_share=0.2)
    assert any(not set(s.images.labels[b.indices]) <= set(s.tasks[b.task].classes) for b in s.batches())
    _, result = run(name, s)
    R = result["accuracy_matrix"]
    assert np.isfinite(R[np.tril_indices(N_TASKS)]).all() and np.isfinite(result["metrics"]["a_auc"])
