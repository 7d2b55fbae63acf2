"""The three usage examples of the loading module's documentation (shared/seed/loading-module.md), ported.

The seed imports ``src.nn_handler``; here it is ``nn_handler``. Sizes are shrunk to keep
the suite fast; the calls are the documented ones, keyword for keyword.
"""
from __future__ import annotations

import helpers_core as hc
import torch
from helpers_core import YourModel

from nn_handler import NNHandler


def _trained_handler_file(tmp_path):
    """A handler with every component, trained two epochs, saved where the seed's example keeps it.

    The model, callbacks, SDE and sampler are the user's own, from one module (helpers_core)."""
    h = hc.full_handler(model=hc.OwnMLP)
    path = tmp_path / "models" / "my_model_checkpoint.pth"
    h.save(path)
    return path, h


def test_loading_a_complete_handler_state_and_resuming(tmp_path, capsys):
    checkpoint_path, original = _trained_handler_file(tmp_path)

    # Load the complete handler state
    loaded_handler = NNHandler.load(
        path=checkpoint_path,
        device="cuda" if torch.cuda.is_available() else "cpu"
    )

    # Resume training from the loaded state
    print(f"Resuming training from epoch {len(loaded_handler.train_losses)}...")
    loaded_handler.train(epochs=3, progress_bar=False)  # Continue training for 3 more epochs

    assert "Resuming training from epoch 2..." in capsys.readouterr().out
    assert loaded_handler.epoch == 5 and len(loaded_handler.train_losses) == 5
    assert loaded_handler.train_losses[:2] == original.train_losses
    assert loaded_handler.ema.num_updates == original.ema.num_updates + 3 * 6
    assert [cb.count for cb in loaded_handler.callbacks if isinstance(cb, hc.Counter)] == [10, 5]


def test_loading_only_model_weights_for_inference(tmp_path, capsys):
    # A pretrained weights file: a bare state_dict, as other code writes it.
    pretrained = YourModel(input_size=20, hidden_size=16, output_size=10)
    weights_path = tmp_path / "models" / "pretrained_weights.pth"
    weights_path.parent.mkdir()
    torch.save(pretrained.state_dict(), weights_path)

    # Initialize a new handler with only the model weights loaded
    inference_handler = NNHandler.initialize_from_checkpoint(
        checkpoint_path=weights_path,
        model_class=YourModel,
        device="cuda" if torch.cuda.is_available() else "cpu",
        # Pass any required model constructor arguments
        input_size=20,
        hidden_size=16,
        output_size=10
    )

    # Set to evaluation mode for inference
    inference_handler.eval()

    # Use the model for inference
    test_input = torch.randn(1, 20).to(inference_handler.device)
    with torch.no_grad():
        output = inference_handler.model(test_input)
        prediction = output.argmax(dim=1).item()
        print(f"Predicted class: {prediction}")

    with torch.no_grad():
        expected = pretrained(test_input.cpu())
    assert torch.allclose(output.cpu(), expected)
    assert prediction == expected.argmax(dim=1).item()
    assert f"Predicted class: {prediction}" in capsys.readouterr().out
    assert not inference_handler.model.training
    assert inference_handler.optimizer is None and inference_handler.train_losses == []


def test_loading_only_model_weights_for_inference_from_a_handler_file(tmp_path):
    checkpoint_path, original = _trained_handler_file(tmp_path)
    inference_handler = NNHandler.initialize_from_checkpoint(
        checkpoint_path=checkpoint_path,
        model_class=type(original.module),
        device="cuda" if torch.cuda.is_available() else "cpu",
        **hc.MODEL_KWARGS,
    )
    inference_handler.eval()
    x = torch.randn(4, hc.IN).to(inference_handler.device)
    original.eval()
    with torch.no_grad():
        assert torch.equal(inference_handler.model(x).cpu(), original.model(x.cpu()))


def test_selective_loading_for_fine_tuning(tmp_path):
    checkpoint_path, original = _trained_handler_file(tmp_path)

    # Load the handler state, but skip optimizer and scheduler
    fine_tune_handler = NNHandler.load(
        path=checkpoint_path,
        device="cuda" if torch.cuda.is_available() else "cpu",
        skip_optimizer=True,
        skip_scheduler=True
    )
    assert fine_tune_handler.optimizer is None and fine_tune_handler.scheduler is None

    # Set up a new optimizer with a lower learning rate for fine-tuning
    fine_tune_handler.set_optimizer(
        optimizer_class=torch.optim.Adam,
        lr=1e-5  # Lower learning rate for fine-tuning
    )

    # Set up a new scheduler if needed
    fine_tune_handler.set_scheduler(
        scheduler_class=torch.optim.lr_scheduler.ReduceLROnPlateau,
        mode='min',
        factor=0.5,
        patience=5
    )

    # Continue training with the new optimization settings
    fine_tune_handler.train(epochs=2, progress_bar=False)

    opt = fine_tune_handler.optimizer
    assert type(opt) is torch.optim.Adam and opt.param_groups[0]["lr"] == 1e-5
    assert opt.param_groups[0]["weight_decay"] == 0  # the saved optimizer's settings were not used
    sched = fine_tune_handler.scheduler
    assert isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau)
    assert (sched.factor, sched.patience, sched.mode) == (0.5, 5, "min") and sched.last_epoch == 2
    assert sched.best in fine_tune_handler.val_losses[2:]  # stepped on the new run's validation losses
    assert fine_tune_handler.epoch == 4 and fine_tune_handler.train_losses[:2] == original.train_losses
    # The weights came from the checkpoint and moved by tiny steps only.
    drift = max((a - b).abs().max().item() for a, b in zip(fine_tune_handler.module.parameters(),
                                                             original.module.parameters()))
    assert 0 < drift < 1e-3
