"""nnh end-to-end demo: train, plot, checkpoint, resume; then score-based sampling and a
log-likelihood.

    python examples/demo.py [--out demo_output] [--quick]

Everything runs on built-in data generated here, on the CPU, in about a minute.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from spiral_task import SpiralNet, accuracy, spirals

from nnh import NNHandler
from nnh.callbacks import CSVLogger, EarlyStopping, EpochTimer, LearningRateMonitor


def classifier_demo(out: Path, quick: bool) -> None:
    print("=" * 72)
    print("1. Classification: train, plot, checkpoint")
    print("=" * 72)
    epochs = 6 if quick else 14
    # seed=0 seeds torch before SpiralNet is built: the same initial weights on every run
    handler = NNHandler(SpiralNet, hidden=64, seed=0, logger_mode=NNHandler.LoggingMode.FILE,
                        logger_filename=str(out / "training.log"))
    handler.set_optimizer(torch.optim.AdamW, lr=3e-3, weight_decay=1e-4)
    handler.set_scheduler(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=epochs + 6)
    handler.set_loss_fn(nn.functional.cross_entropy)
    handler.set_train_loader(spirals(3000, seed=1), batch_size=64, shuffle=True)
    handler.set_val_loader(spirals(1000, seed=2), batch_size=256)
    handler.add_metric("accuracy", accuracy)
    handler.add_callback(LearningRateMonitor())
    handler.add_callback(EpochTimer())
    handler.add_callback(CSVLogger(str(out / "history.csv")))
    handler.add_callback(EarlyStopping(monitor="val_loss", patience=5))
    handler.auto_save(interval=5, save_path=str(out / "checkpoints"), name="spiral_epoch{epoch:02d}")

    t0 = time.perf_counter()
    handler.train(epochs=epochs, ema_decay=0.99, gradient_clipping_norm=5.0)
    print(f"trained {len(handler.train_losses)} epochs in {time.perf_counter() - t0:.1f} s")
    print(handler.print())

    handler.plot_losses(save_path=str(out / "losses.png"))
    handler.plot_metrics(save_path_prefix=str(out / "metric"))
    checkpoint = out / "spiral_classifier.pth"
    handler.save(str(checkpoint))
    print(f"plots: {out / 'losses.png'}, {out / 'metric_accuracy.png'}; checkpoint: {checkpoint}")

    ema_acc = _accuracy_of(handler, apply_ema=True)
    raw_acc = _accuracy_of(handler, apply_ema=False)
    print(f"validation accuracy: {raw_acc:.3f} (live weights), {ema_acc:.3f} (EMA weights)")

    print()
    print("=" * 72)
    print("2. Resume: load the checkpoint in a fresh handler and keep training")
    print("=" * 72)
    resumed = NNHandler.load(str(checkpoint))
    done = len(resumed.train_losses)
    print(f"loaded {checkpoint.name}: {done} epochs of history, optimizer step {resumed.state.step}, "
          f"lr {resumed.optimizer.param_groups[0]['lr']:.2e}, callbacks "
          f"{[type(c).__name__ for c in resumed.callbacks]}")
    resumed.train(epochs=3)  # the saved options (EMA, clipping) continue; logs go to training.log
    print(f"resumed training: epochs {done + 1}..{len(resumed.train_losses)}, "
          f"val loss {resumed.val_losses[done - 1]:.4f} -> {resumed.val_losses[-1]:.4f}, "
          f"val accuracy {resumed.val_metrics_history['accuracy'][-1]:.3f}")
    resumed.plot_losses(save_path=str(out / "losses_after_resume.png"))
    resumed.save(str(out / "spiral_classifier_resumed.pth"))


def _accuracy_of(handler: NNHandler, apply_ema: bool) -> float:
    data = handler.val_loader.dataset
    outputs = torch.cat(handler.predict(handler.val_loader, apply_ema=apply_ema))
    return float(accuracy(outputs, data.tensors[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="demo_output")
    ap.add_argument("--quick", action="store_true", help="fewer epochs (for tests)")
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    classifier_demo(out, args.quick)

    print()
    print("=" * 72)
    print("3. Score-based generative model: train, sample, log-likelihood")
    print("=" * 72)
    from generative_demo import run_generative_demo

    result = run_generative_demo(out, quick=args.quick)
    for key, value in result.items():
        print(f"{key:>28}: {value}")
    print()
    print(f"All outputs are in {out.resolve()}")


if __name__ == "__main__":
    main()
