"""The RL loop's sampling path through tinker-cookbook, against the emulator.

Runs under .venv-cookbook's interpreter. It samples with the cookbook's own
`completers.TinkerTokenCompleter` from both kinds of sampling client the RL trainer makes
(`save_weights_and_get_sampling_client`, and `create_sampling_client(sampler_path)` after
`save_weights_for_sampler`), then trains one importance-sampling step on what it sampled, as
`rl/train.py` does. It prints one `RLJOB {...}` JSON line per completion and one for the
training step, and exits 0.

    python tests/cookbook/rl_sample_job.py [--max-tokens 6] [--rollouts 4]

Environment: as sl_job.py (TINKER_BASE_URL, TINKER_API_KEY, TINKER_TELEMETRY=0).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

import tinker
import torch
from tinker_cookbook.completers import TinkerTokenCompleter

MARKER = "RLJOB "
PROMPT = [1, 5, 6, 7, 8]
STOP_TOKEN = 2


def emit(event: str, **fields: Any) -> None:
    # A job script: its stdout is its report to the test.
    print(MARKER + json.dumps({"event": event, **fields}), flush=True)  # noqa: T201


async def rollouts(
    sampler: tinker.SamplingClient, kind: str, n: int, max_tokens: int
) -> list[tuple[list[int], list[float]]]:
    completer = TinkerTokenCompleter(sampling_client=sampler, max_tokens=max_tokens)
    done = await asyncio.gather(
        *(completer(tinker.ModelInput.from_ints(PROMPT), [STOP_TOKEN]) for _ in range(n))
    )
    out = []
    for result in done:
        logprobs = list(result.maybe_logprobs or [])
        emit(
            "completion",
            kind=kind,
            tokens=list(result.tokens),
            logprobs=len(logprobs),
            stop_reason=result.stop_reason,
        )
        out.append((list(result.tokens), logprobs))
    return out


def rl_datum(tokens: list[int], logprobs: list[float], advantage: float) -> tinker.Datum:
    """Prompt plus completion, the loss on the completion only (as rl/data_processing does)."""
    full = PROMPT + tokens
    prompt_part = len(PROMPT) - 1
    return tinker.Datum(
        model_input=tinker.ModelInput.from_ints(full[:-1]),
        loss_fn_inputs={
            "target_tokens": tinker.TensorData.from_torch(torch.tensor(full[1:])),
            "logprobs": tinker.TensorData.from_torch(
                torch.tensor([0.0] * prompt_part + logprobs, dtype=torch.float32)
            ),
            "advantages": tinker.TensorData.from_torch(
                torch.tensor([0.0] * prompt_part + [advantage] * len(tokens))
            ),
        },
    )


async def run(max_tokens: int, n: int) -> None:
    service = tinker.ServiceClient()
    try:
        trainer = await service.create_lora_training_client("Qwen/Qwen3-8B", rank=8)
        snapshot = await trainer.save_weights_and_get_sampling_client()
        sampled = await rollouts(snapshot, "snapshot", n, max_tokens)
        saved = await trainer.save_weights_for_sampler("000000")
        from_path = await trainer.create_sampling_client(saved.path)
        sampled += await rollouts(from_path, "sampler_path", n, max_tokens)
        data = [rl_datum(t, lp, 1.0 if i % 2 else -1.0) for i, (t, lp) in enumerate(sampled)]
        out = await trainer.forward_backward(data, "importance_sampling")
        await trainer.optim_step(tinker.AdamParams(learning_rate=1e-5))
        emit(
            "trained",
            outputs=[len(o["logprobs"].data) for o in out.loss_fn_outputs],
            targets=[len(d.loss_fn_inputs["target_tokens"].data) for d in data],
        )
    finally:
        await service.close("success")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--max-tokens", type=int, default=6)
    parser.add_argument("--rollouts", type=int, default=4)
    args = parser.parse_args(argv)
    asyncio.run(run(args.max_tokens, args.rollouts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
