"""Experience replay (``er``): a reservoir buffer of past stream samples, replayed with each batch."""

from __future__ import annotations

import torch

from routemem.errors import ConfigError
from routemem.layers.options import check_int
from routemem.models.vit import VisionTransformer
from routemem.train.continual.methods import Method


class ReservoirBuffer:
    """A fixed-capacity sample of everything added so far, by Vitter's algorithm R: the first
    ``capacity`` samples fill the buffer; the n-th sample after that (n counted from 1 over all
    samples added) draws j uniformly from 0..n-1 and replaces slot j when j < capacity. Every sample
    added is then in the buffer with probability capacity / n_seen. Draws come from torch's global
    generator (seeded by the loop), on the CPU."""

    def __init__(self, capacity: int):
        self.capacity = check_int("ReservoirBuffer", "capacity", capacity)
        self.n_seen = 0
        self.images: torch.Tensor | None = None
        self.labels: torch.Tensor | None = None
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def add(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        images, labels = images.detach(), labels.detach()
        if self.images is None:  # storage sized and placed like the first batch
            self.images = images.new_empty((self.capacity, *images.shape[1:]))
            self.labels = labels.new_empty((self.capacity,))
        counts = torch.arange(self.n_seen + 1, self.n_seen + len(labels) + 1, dtype=torch.float64)
        draws = (torch.rand(len(labels), dtype=torch.float64) * counts).floor().long().tolist()
        for i, j in enumerate(draws):  # in order: a later sample overwrites an earlier one's slot
            self.n_seen += 1
            if self._size < self.capacity:
                slot = self._size
                self._size += 1
            elif j < self.capacity:
                slot = j
            else:
                continue
            self.images[slot] = images[i]
            self.labels[slot] = labels[i]

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """min(n, len) stored samples, drawn without replacement."""
        idx = torch.randperm(self._size)[:n].to(self.labels.device)
        return self.images[idx], self.labels[idx]


class ExperienceReplay(Method):
    """Experience replay, the usual online upper reference: the whole ViT fine-tunes; each update
    trains on the stream batch concatenated with an equal-size batch drawn from a reservoir buffer
    (``buffer_size`` samples, default 500; fewer while it fills, none on the very first batch).
    The buffer takes each stream sample once, after the batch's updates. Loss: cross-entropy over
    the classes seen so far (``train_mask="seen"``; replayed classes are seen). Adam, lr 1e-4 (as
    finetune)."""

    name = "er"
    description = "experience replay: fine-tune everything on stream + reservoir-buffer batches"

    def __init__(self, vit: VisionTransformer, n_classes: int, n_tasks: int, *, lr: float = 1e-4,
                 train_mask: str = "seen", buffer_size: int = 500):
        if train_mask != "seen":  # "task" would mask the replayed classes out of their own loss
            raise ConfigError(f"er: train_mask must be 'seen' (replayed samples belong to earlier tasks), got {train_mask!r}")
        super().__init__(vit, n_classes, n_tasks, lr=lr, train_mask=train_mask)
        self.buffer = ReservoirBuffer(buffer_size)

    def _training_batch(self, images, labels):
        if not len(self.buffer):
            return images, labels
        old_images, old_labels = self.buffer.sample(len(labels))
        return torch.cat([images, old_images]), torch.cat([labels, old_labels])

    def after_batch(self, images, labels) -> None:
        self.buffer.add(images, labels)
