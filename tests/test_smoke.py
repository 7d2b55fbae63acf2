import torch

from nn_handler import NNHandler
from nn_handler.models import MLP

DATA = {"_target_": "nn_handler.datasets.synthetic_classification", "n": 128, "in_features": 8, "num_classes": 3}


def test_demo_runs_end_to_end(tmp_path, capsys):
    from nn_handler.demo import main

    main(["--out", str(tmp_path), "--epochs", "1"])
    out = capsys.readouterr().out
    assert "resuming from epoch 1" in out
    assert (tmp_path / "demo.pt").is_file()


def test_train_records_one_loss_per_epoch():
    h = NNHandler(MLP, in_features=8, out_features=3)
    h.set_optimizer(torch.optim.SGD, lr=0.1)
    h.set_loss_fn(torch.nn.CrossEntropyLoss)
    h.set_train_loader(DATA, batch_size=32, shuffle=True)
    h.train(epochs=3, progress_bar=False)
    assert len(h.train_losses) == 3 and h.epoch == 3
    assert h.train_losses[-1] < h.train_losses[0]
