"""The loop's arithmetic: gradient accumulation averages, including the short last group."""
import torch
from torch.utils.data import TensorDataset

from nn_handler import NNHandler


class Line(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([1.0]))

    def forward(self, x):
        return x * self.w


def test_short_last_accumulation_group_is_averaged_over_its_own_size():
    x = torch.tensor([[1.0], [2.0], [3.0], [4.0], [5.0], [6.0]])
    y = torch.zeros(6, 1)
    h = NNHandler(Line, model_type="regression")
    h.set_optimizer(torch.optim.SGD, lr=0.01)
    h.set_loss_fn(torch.nn.MSELoss)
    h.set_train_loader(TensorDataset(x, y), batch_size=1)
    h.train(1, gradient_accumulation_steps=4, progress_bar=False)

    w = 1.0
    for group in ([1.0, 2.0, 3.0, 4.0], [5.0, 6.0]):  # d/dw (x w)^2 = 2 x^2 w, averaged over the group
        w -= 0.01 * sum(2 * v * v * w for v in group) / len(group)
    assert torch.allclose(h.module.w, torch.tensor([w]))
    assert h.global_step == 2


class _Batches(torch.utils.data.IterableDataset):
    """Six (x, y) batches of one sample each, of unknown length to the loop."""

    def __iter__(self):
        for v in range(1, 7):
            yield torch.tensor([[float(v)]]), torch.zeros(1, 1)


def test_an_iterable_datasets_short_last_group_is_averaged_over_its_own_size_too():
    h = NNHandler(Line, model_type="regression")
    h.set_optimizer(torch.optim.SGD, lr=0.01)
    h.set_loss_fn(torch.nn.MSELoss)
    h.set_train_loader(_Batches(), batch_size=None)
    h.train(1, gradient_accumulation_steps=4, progress_bar=False)

    w = 1.0
    for group in ([1.0, 2.0, 3.0, 4.0], [5.0, 6.0]):
        w -= 0.01 * sum(2 * v * v * w for v in group) / len(group)
    assert torch.allclose(h.module.w, torch.tensor([w]))
    assert h.global_step == 2 and h.epoch == 1
