"""The training loop on a toy model: exact resume, accumulation, early stopping, NaN stop, fp16 scaler state."""

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from helpers import label_task
from nibble.data import BatchStream, ClassificationData, LabelMap
from nibble.errors import NibbleError
from nibble.train import TrainConfig
from nibble.train.checkpoint import list_checkpoints
from nibble.train.metrics import classification_loss
from nibble.train.trainer import Trainer


class Toy(nn.Module):
    """Embedding -> dropout -> masked mean -> linear head."""

    def __init__(self, vocab=40, dim=12, labels=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.drop = nn.Dropout(0.2)
        self.score = nn.Linear(dim, labels)

    def forward(self, ids, mask):
        h = self.drop(self.embed(ids)) * mask.unsqueeze(-1)
        return self.score(h.sum(1) / mask.sum(1, keepdim=True))


def toy_data(n=24, labels=3, same_length=False):
    gen = torch.Generator().manual_seed(0)
    ids, targets = [], []
    for i in range(n):
        y = i % labels
        length = 4 if same_length else 2 + i % 5
        ids.append([1 + y * 10 + int(t) for t in torch.randint(0, 10, (length,), generator=gen)])
        targets.append(y)
    return ClassificationData(ids, targets, LabelMap(list(range(labels))))


def make_trainer(tmp_path, total=12, evaluate=None, loss_fn=None, data=None, **overrides):
    options = dict(lr=0.05, batch_size=4, save_every=4, eval_every=0, log_every=1, warmup_ratio=0.25, dtype="float32")
    options.update(overrides)
    config = TrainConfig(model="m", data="d", output=str(tmp_path), **options)
    torch.manual_seed(0)
    model = Toy()
    data = data or toy_data()
    stream = BatchStream(data, config.batch_size, 0, config.seed)

    task = label_task(data, loss_fn, evaluate)
    trainer = Trainer(model=model, stream=stream, config=config, out=tmp_path, total_steps=total, task=task)
    return trainer, model


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_resume_from_a_checkpoint_gives_identical_weights(tmp_path):
    full, model_a = make_trainer(tmp_path / "a", grad_accum=2)
    full.train()
    partial, _ = make_trainer(tmp_path / "b", grad_accum=2)
    partial.train()
    step8 = dict(list_checkpoints(tmp_path / "b" / "checkpoints"))[8]
    torch.manual_seed(123)  # the checkpoint's RNG state must win over whatever the process holds
    resumed, model_c = make_trainer(tmp_path / "b", grad_accum=2)
    resumed.resume(step8)
    assert resumed.progress.step == 8 and resumed.stream.position == 16
    resumed.train()
    for key, value in weights(model_a).items():
        assert torch.equal(value, weights(model_c)[key]), key
    records = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 13))  # steps after the checkpoint were not duplicated
    ckpt = load_file(tmp_path / "a" / "checkpoints" / "step-12" / "trainable.safetensors")
    assert set(ckpt) == {"embed.weight", "score.weight", "score.bias"}
    assert [s for s, _ in list_checkpoints(tmp_path / "a" / "checkpoints")] == [4, 8, 12]


@pytest.mark.cpu_bf16
def test_gradient_accumulation_equals_a_bigger_batch(tmp_path):
    data = toy_data(same_length=True)
    big, model_big = make_trainer(tmp_path / "big", total=3, data=data, batch_size=8, grad_accum=1, save_every=0)
    small, model_small = make_trainer(tmp_path / "small", total=3, data=data, batch_size=4, grad_accum=2, save_every=0)
    model_big.drop.p = model_small.drop.p = 0.0
    big.train(), small.train()
    for key, value in weights(model_big).items():
        torch.testing.assert_close(value, weights(model_small)[key], rtol=1e-5, atol=1e-6)


def test_early_stopping_and_best_tracking(tmp_path):
    losses = iter([1.0, 0.8, 0.9, 0.85, 0.7])
    calls = []

    def evaluate(model):
        return {"loss": next(losses), "accuracy": 0.5, "macro_f1": 0.5}

    trainer, _ = make_trainer(tmp_path, total=20, evaluate=evaluate, eval_every=2, early_stopping_patience=2)
    trainer.on_best = calls.append
    progress = trainer.train()
    assert progress.stopped_early and progress.step == 8
    assert progress.best_val_loss == 0.8 and progress.best_step == 4
    assert calls == [2, 4]
    evals = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert [e["step"] for e in evals] == [2, 4, 6, 8]
    assert list_checkpoints(tmp_path / "checkpoints")[-1][0] == 8


def test_nan_loss_stops_with_the_last_good_checkpoint_intact(tmp_path):
    def loss_fn(logits, labels):
        loss = classification_loss(logits, labels, False)
        return loss * float("nan") if trainer.progress.step == 5 else loss

    trainer, _ = make_trainer(tmp_path, total=12, loss_fn=loss_fn)
    with pytest.raises(NibbleError, match=r"step 6: the training loss is nan .*last good checkpoint is .*step-4"):
        trainer.train()
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [4]
    assert not any(".tmp-" in p.name for p in (tmp_path / "checkpoints").iterdir())


def test_fp16_autocast_keeps_the_grad_scaler_in_checkpoints(tmp_path):
    trainer, model = make_trainer(tmp_path, total=4, dtype="float16")
    progress = trainer.train()
    assert progress.step == 4
    assert model.score.weight.dtype == torch.float32
    state = json.loads((tmp_path / "checkpoints" / "step-4" / "state.json").read_text())
    assert state["scaler"]["scale"] > 0 and set(state["rng"]) == {"numpy", "python"}
    assert state["scheduler"]["total_steps"] == 4


def test_schedule_and_clipping_are_applied(tmp_path):
    trainer, model = make_trainer(tmp_path / "a", total=8, warmup_ratio=0.25, save_every=0, weight_decay=0.0)
    before = weights(model)
    trainer.train()
    records = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in records]
    assert lrs[:3] == [0.025, 0.05, 0.05]  # two warmup steps, then cosine from the peak
    assert all(a > b for a, b in zip(lrs[2:], lrs[3:], strict=False))
    assert trainer.optimizer.param_groups[0]["fused"] is True
    moved = (weights(model)["score.weight"] - before["score.weight"]).abs().max()
    # Clipping to a norm far below Adam's eps shrinks every update by orders of magnitude.
    clipped, model_c = make_trainer(
        tmp_path / "b", total=8, warmup_ratio=0.25, save_every=0, weight_decay=0.0, max_grad_norm=1e-12
    )
    clipped.train()
    assert (weights(model_c)["score.weight"] - before["score.weight"]).abs().max() < moved * 1e-2
    assert all(r["grad_norm"] > 1e-3 for r in records)  # the logged norm is the one before clipping
