"""Train the digits example from Python: the plain-API counterpart of the CLI's default run.

    python examples/digits.py --devices 2 --bits 4               # QSGD, a fixed 4 bits per coordinate
    python examples/digits.py --devices 2 --bits 4 --policy dq   # DQ-SGD: 4 bits on average
    python examples/digits.py --devices 2 --stock-ddp            # stock DDP, bytes metered

The data set ships with scikit-learn (1,797 8x8 images), so this runs on a machine with no
internet. CommunicationMonitor prints the communication summary (bytes sent, compression ratio)
at the end. The same run through the CLI:

    python -m lightning_compress.cli fit \
        --config examples/configs/base.yaml --config examples/configs/qsgd.yaml
"""

from __future__ import annotations

import argparse

import pytorch_lightning as pl

from lightning_compress import CommunicationMonitor, CompressedDDP
from lightning_compress.compressors import QSGD
from lightning_compress.examples import DigitsCNN, DigitsDataModule
from lightning_compress.policies import DQPolicy


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=2, help="CPU processes (default 2)")
    parser.add_argument("--bits", type=int, default=4, help="QSGD bits, or DQ's mean (default 4)")
    parser.add_argument("--policy", choices=["none", "dq"], default="none", help="adapt the bit width")
    parser.add_argument("--stock-ddp", action="store_true", help="Lightning's DDP; the monitor meters it")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--max-steps", type=int, default=-1, help="stop early (for smoke tests)")
    parser.add_argument("--root-dir", default=None, help="where lightning_logs/ goes (default: here)")
    args = parser.parse_args(argv)

    pl.seed_everything(0)
    policy = DQPolicy(mean_bits=float(args.bits)) if args.policy == "dq" else None
    if args.stock_ddp:
        # The monitor installs the package's hook on stock DDP: float32 without a policy,
        # QSGD with the policy's bit width with one.
        strategy: str | CompressedDDP = "ddp"
    else:
        strategy = CompressedDDP(compressor=QSGD(bits=args.bits))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=strategy,
        max_epochs=args.epochs,
        max_steps=args.max_steps,
        log_every_n_steps=5,
        default_root_dir=args.root_dir,
        callbacks=[CommunicationMonitor(policy=policy)],
    )
    trainer.fit(DigitsCNN(lr=0.05, momentum=0.9, cosine=True), datamodule=DigitsDataModule(batch_size=32))
    accuracy = float(trainer.callback_metrics.get("val_acc", float("nan")))
    if trainer.is_global_zero:
        print(f"validation accuracy after {trainer.current_epoch} epochs: {accuracy:.4f}")
    return accuracy


if __name__ == "__main__":
    main()
