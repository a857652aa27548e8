"""Make a model's training loss NaN at one chosen step, to test what divergence leaves behind."""

from routemem.models import TransformerLM


def nan_loss_at_step(monkeypatch, step: int) -> None:
    """From now on, the ``step``-th training forward (counting from 1, as metrics.jsonl does)
    returns a NaN loss; every other call is the real forward. ``monkeypatch.undo()`` restores it."""
    original = TransformerLM.forward
    calls = {"n": 0}

    def poisoned(self, idx, targets=None):
        out = original(self, idx, targets)
        if targets is not None and self.training:
            calls["n"] += 1
            if calls["n"] == step:
                return out[0], out[1] * float("nan")
        return out

    monkeypatch.setattr(TransformerLM, "forward", poisoned)
