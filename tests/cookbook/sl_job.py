"""A tinker-cookbook supervised job: `tinker_cookbook.supervised.train.main`, unmodified.

Runs under .venv-cookbook's interpreter (`make cookbook`), against whatever TINKER_BASE_URL
points at (the emulator in the tests). The data are hand-made token ids and the tokenizer a
tiny one registered with `tokenizer_utils.register_tokenizer`, so nothing is downloaded.
It saves through the cookbook's own CheckpointManager into `<log_path>/checkpoints.jsonl`
and, started again with the same `--log-path`, resumes through the cookbook's own resume
path (the last record with a `state_path`), as a recipe restarted by its launcher does.

    python tests/cookbook/sl_job.py --log-path DIR [--batches 12] [--save-every 2]
        [--batch-size 2] [--hold-at-batch N] [--rolling-save-every N]
        [--model-name Qwen/Qwen3-8B] [--renderer-name role_colon] [--lora-rank 8]

Environment: TINKER_BASE_URL, TINKER_API_KEY (`tml-...`), TINKER_TELEMETRY=0; HF_HUB_OFFLINE=1.
The cookbook fetches a pricing file over HTTPS at start-up (and carries on without it):
point HTTPS_PROXY at a closed 127.0.0.1 port to keep that off the network.

On stdout, besides the cookbook's own logging, the job prints one line per batch it is
asked for, `SLJOB {"event": "batch", "batch": N, "pid": P}`, and `SLJOB {"event": "hold", ...}`
when it reaches `--hold-at-batch`, where it then blocks for good (its session stays alive)
so a test can corrupt or kill it at a known point. Exit code 0 when training completed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
from typing import Any, ClassVar, cast

import chz
import tinker
import torch
from tinker_cookbook import tokenizer_utils
from tinker_cookbook.supervised import train
from tinker_cookbook.supervised.common import datum_from_model_input_weights
from tinker_cookbook.supervised.types import SupervisedDataset, SupervisedDatasetBuilder

MARKER = "SLJOB "
VOCAB = 26
"""Ids 3..28 are the letters a..z; 0, 1, 2 are pad, bos and eos."""


def emit(event: str, **fields: Any) -> None:
    # A job script: its stdout is its report to the test.
    print(MARKER + json.dumps({"event": event, "pid": os.getpid(), **fields}), flush=True)  # noqa: T201


class TinyTokenizer:
    """Enough of a tokenizer for the supervised loop: encode, decode and special ids."""

    name_or_path = "tinker-recovery/tiny-letters"
    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
    all_special_ids: ClassVar[list[int]] = [0, 1, 2]
    vocab_size = VOCAB + 3

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [3 + (ord(c) - ord("a")) % VOCAB for c in text.lower() if c.isalpha()]
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def decode(self, token_ids: Any, skip_special_tokens: bool = False, **_: Any) -> str:
        ids = [int(t) for t in token_ids]
        return "".join(
            chr(ord("a") + (t - 3) % VOCAB) if t >= 3 else ("" if skip_special_tokens else "|")
            for t in ids
        )


class HandMadeTokens(SupervisedDataset):
    """`batches` batches of `batch_size` sequences of letter ids, the same in every run."""

    def __init__(self, batches: int, batch_size: int, seq_len: int, hold_at: int | None) -> None:
        self.batches, self.batch_size, self.seq_len, self.hold_at = (
            batches,
            batch_size,
            seq_len,
            hold_at,
        )

    def get_batch(self, index: int) -> list[tinker.Datum]:
        if index == self.hold_at:
            emit("hold", batch=index)
            threading.Event().wait()  # until the test kills this process
        emit("batch", batch=index)
        data = []
        for j in range(self.batch_size):
            tokens = [1] + [3 + (index * 7 + j * 5 + k) % VOCAB for k in range(self.seq_len)]
            weights = torch.ones(len(tokens), dtype=torch.float32)
            weights[0] = 0.0
            data.append(
                datum_from_model_input_weights(tinker.ModelInput.from_ints(tokens), weights)
            )
        return data

    def __len__(self) -> int:
        return self.batches

    def set_epoch(self, seed: int = 0) -> None:
        """The order never changes (resume tests compare batch indices)."""


@chz.chz
class HandMadeTokensBuilder(SupervisedDatasetBuilder):
    batches: int = 12
    batch_size: int = 2
    seq_len: int = 12
    hold_at_batch: int | None = None

    def __call__(self) -> tuple[SupervisedDataset, SupervisedDataset | None]:
        return HandMadeTokens(self.batches, self.batch_size, self.seq_len, self.hold_at_batch), None


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--log-path", required=True)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--save-every", type=int, default=2)
    parser.add_argument("--rolling-save-every", type=int, default=0)
    parser.add_argument("--hold-at-batch", type=int, default=None)
    parser.add_argument("--model-name", default="Qwen/Qwen3-8B")
    parser.add_argument("--renderer-name", default="role_colon")
    parser.add_argument("--lora-rank", type=int, default=8)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    tokenizer = TinyTokenizer()
    # The cookbook types tokenizers as transformers' PreTrainedTokenizer; this one only has
    # the part the supervised loop uses.
    factory = cast(Any, lambda: tokenizer)
    tokenizer_utils.register_tokenizer(args.model_name, factory)
    config = train.Config(
        log_path=args.log_path,
        model_name=args.model_name,
        recipe_name="tinker_recovery_sl_job",
        renderer_name=args.renderer_name,
        dataset_builder=HandMadeTokensBuilder(
            batches=args.batches, batch_size=args.batch_size, hold_at_batch=args.hold_at_batch
        ),
        lora_rank=args.lora_rank,
        save_every=args.save_every,
        rolling_save_every=args.rolling_save_every,
        eval_every=0,
        infrequent_eval_every=0,
    )
    emit("start", log_path=args.log_path)
    asyncio.run(train.main(config))
    emit("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
