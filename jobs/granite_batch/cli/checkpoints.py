"""`granite-batch tiny-model` and `tiny-lm`: tiny random checkpoints for tests and trials."""

from __future__ import annotations

import argparse

from granite_batch.cli.common import EXIT_OK


def register_tiny_model(commands: argparse._SubParsersAction) -> None:
    tiny = commands.add_parser("tiny-model", help="write a tiny random Granite Speech checkpoint to DIR")
    tiny.add_argument("directory")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument(
        "--model-type",
        default="granite_speech",
        choices=("granite_speech", "granite_speech_plus", "granite_speech5_ctc"),
        help="architecture: granite_speech (4.0-1b, 4.1-2b), granite_speech_plus (4.1-2b-plus) or "
        "granite_speech5_ctc (5.0 TurboCTC); default granite_speech",
    )
    tiny.add_argument(
        "--head-dim",
        type=int,
        default=16,
        choices=(16, 32),
        help="the text model's attention head size; 32 for engine vllm (its CPU attention needs 32 or more)",
    )
    tiny.set_defaults(handler=_cmd_tiny_model)


def _cmd_tiny_model(args: argparse.Namespace) -> int:
    from granite_batch.testing.tiny_model import write_tiny_model

    path = write_tiny_model(args.directory, seed=args.seed, model_type=args.model_type, head_dim=args.head_dim)
    print(f"wrote a tiny random {args.model_type} checkpoint to {path}; use it with --model {path}")
    return EXIT_OK


def register_tiny_lm(commands: argparse._SubParsersAction) -> None:
    tiny_lm = commands.add_parser("tiny-lm", help="write a tiny random Granite language model checkpoint to DIR")
    tiny_lm.add_argument("directory")
    tiny_lm.add_argument("--seed", type=int, default=0)

    tiny_lm.set_defaults(handler=_cmd_tiny_lm)


def _cmd_tiny_lm(args: argparse.Namespace) -> int:
    from granite_batch.testing.tiny_lm import write_tiny_lm

    path = write_tiny_lm(args.directory, seed=args.seed)
    print(f"wrote a tiny random Granite language model to {path}; use it with second-pass --model {path}")
    return EXIT_OK
