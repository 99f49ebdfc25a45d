"""A small training job for the exec tests: the official SDK against the emulator, no recovery code.

    sdk_job.py OUT MODE [--from PATH] [--metadata JSON] [--scrub-env]

Writes one JSON object to OUT when it has trained (model_id, saved path). It knows nothing of
tinker-recovery: it passes only its own `--metadata` and resumes from `--from` (or starts a
fresh LoRA run), the way an unmodified user script does. MODE:
- `train`: create the client, one forward_backward + optim_step, save_state, close, exit 0;
- `train-wait`: as `train`, then wait for SIGTERM (a long-running job), exit 0;
- `exit3`: exit 3 before touching the SDK; `sigkill`: SIGKILL itself before touching it;
- `load`: only create the client from `--from` (fails if unloadable) and exit 0 without training.
`--scrub-env` deletes every TINKER_RECOVERY_* variable from its environment first.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("mode")
    parser.add_argument("--from", dest="source")
    parser.add_argument("--metadata")
    parser.add_argument("--scrub-env", action="store_true")
    args = parser.parse_args()
    if args.scrub_env:
        for name in [n for n in os.environ if n.startswith("TINKER_RECOVERY_")]:
            del os.environ[name]
    if args.mode == "exit3":
        return 3
    if args.mode == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    import numpy as np
    import tinker
    from tinker import types

    metadata = json.loads(args.metadata) if args.metadata else None
    service = tinker.ServiceClient()
    if args.source:
        pending = service.create_training_client_from_state_with_optimizer(
            args.source, user_metadata=metadata
        )
    else:
        pending = service.create_lora_training_client(
            "Qwen/Qwen3-8B", rank=8, user_metadata=metadata
        )
    try:
        client = pending.result()
    except Exception as exc:
        sys.stderr.write(f"could not create the training client: {exc}\n")
        return 1
    if args.mode == "load":
        service.close("success").result()
        return 0
    datum = types.Datum(
        model_input=types.ModelInput.from_ints([1, 2, 3]),
        loss_fn_inputs={
            "target_tokens": types.TensorData.from_numpy(np.array([2, 3, 4], dtype=np.int64)),
            "weights": types.TensorData.from_numpy(np.ones(3, dtype=np.float32)),
        },
    )
    client.forward_backward([datum], "cross_entropy").result()
    client.optim_step(types.AdamParams(learning_rate=1e-4)).result()
    saved = client.save_state("step-1").result().path
    with open(args.out, "w") as out:
        json.dump({"model_id": client.model_id, "saved": saved, "pid": os.getpid()}, out)
    if args.mode == "train-wait":
        stop.wait()
    service.close("success").result()
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # see tests/e2e/handoff_job.py: the SDK's threads can abort finalisation
