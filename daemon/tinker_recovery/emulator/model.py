"""The emulator's stand-in for a model: deterministic numbers in the shapes the service returns.

No maths is done. A run's loss falls slowly with its optimizer step count, so a training
loop sees a plausible curve, and restoring a checkpoint continues the curve from the step it
was saved at. Per-token values vary a little with the token and its position, and are the
same for the same inputs every time. Sampling draws its tokens from the prompt's own tokens
(so whatever tokenizer the job uses can decode them) plus any stop token asked for.
Nothing here does I/O or reads a clock.
"""

from __future__ import annotations

import hashlib
import math
import random
import struct
from collections.abc import Sequence
from dataclasses import dataclass

FLOOR_NLL = 0.4
"""Where the per-token loss levels off after many steps (nats)."""
START_NLL = 2.4
"""The per-token loss of a fresh adapter (nats)."""
HALF_LIFE_STEPS = 20.0
"""Steps after which the loss has come half way down from START_NLL to FLOOR_NLL."""


def mean_nll(step: int) -> float:
    """The mean per-token loss a run shows after `step` optimizer steps."""
    return FLOOR_NLL + (START_NLL - FLOOR_NLL) / (1.0 + max(step, 0) / HALF_LIFE_STEPS)


def _jitter(token: int, position: int) -> float:
    """A fixed factor in [0.8, 1.2) for one (token, position) pair."""
    mixed = (token * 2654435761 + position * 40503 + 12345) & 0xFFFFFFFF
    return 0.8 + 0.4 * (mixed / 2**32)


def target_logprobs(targets: Sequence[int], step: int) -> list[float]:
    """One log-probability per target token (all negative), falling in size as `step` grows."""
    nll = mean_nll(step)
    return [-nll * _jitter(token, i) for i, token in enumerate(targets)]


def prompt_logprobs(prompt: Sequence[int], step: int) -> list[float]:
    """Log-probabilities of each prompt token given the ones before it; the first has none
    (NaN, which the SDK turns into None)."""
    if not prompt:
        return []
    return [math.nan, *target_logprobs(prompt[1:], step)]


@dataclass(frozen=True, slots=True)
class Continuation:
    """One sampled continuation."""

    tokens: list[int]
    logprobs: list[float]
    stopped: bool
    """True when a stop token or string ended it, False when max_tokens did."""


def _rng(seed: int | None, prompt: Sequence[int], request_seq: int) -> random.Random:
    if seed is not None:
        return random.Random(seed)
    digest = hashlib.sha256(struct.pack(f"<q{len(prompt)}q", request_seq, *prompt)).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def sample(
    prompt: Sequence[int],
    *,
    num_samples: int,
    max_tokens: int,
    stop_tokens: Sequence[int],
    may_stop_early: bool,
    seed: int | None,
    request_seq: int,
    step: int,
) -> list[Continuation]:
    """`num_samples` continuations of at most `max_tokens` tokens each.

    With stop tokens, about half the continuations end early on one of them (included, as
    the service includes the stop token it met). `may_stop_early` stands for stops the
    emulator cannot see (stop strings, which need a tokenizer, or the model's implicit end of
    sequence): about half end early then too, without a particular last token. Otherwise
    every continuation runs to `max_tokens` and ends with stop reason "length".
    """
    rng = _rng(seed, prompt, request_seq)
    vocabulary = sorted(set(prompt)) or [0]
    can_stop = bool(stop_tokens) or may_stop_early
    out: list[Continuation] = []
    for _ in range(num_samples):
        length = max_tokens
        stopped = False
        if can_stop and max_tokens > 0 and rng.random() < 0.5:
            length = rng.randint(1, max_tokens)
            stopped = True
        tokens = [rng.choice(vocabulary) for _ in range(length)]
        if stopped and stop_tokens:
            tokens[-1] = stop_tokens[rng.randrange(len(stop_tokens))]
        out.append(Continuation(tokens, target_logprobs(tokens, step), stopped))
    return out
