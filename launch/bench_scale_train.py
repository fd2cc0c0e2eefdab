"""One TRAIN step of `timeshare bench scale`, in a trainer rank of its own (under torchrun, one rank):
the real `Trainer` on the model directory, GRPO on a batch the job rolled out. Prints one JSON line:
the step's seconds, the rank's RSS before it and its highest during it (sampled every 10 ms), and
the rank's peak over its life (loading the checkpoint included).

    torchrun --standalone --nproc-per-node 1 -m launch.bench_scale_train MODEL_DIR BATCH DTYPE
"""

from __future__ import annotations

import json
import resource
import sys
import threading
import time

import psutil


def main() -> None:
    from engine.algorithms import AlgoConfig
    from engine.batch import load_batch
    from sidecars.megatron.config import TrainerConfig
    from sidecars.megatron.parallel import ParallelConfig, init_distributed, shutdown
    from sidecars.megatron.trainer import Trainer

    model_dir, batch_path, dtype = sys.argv[1:4]
    init_distributed(ParallelConfig())
    trainer = Trainer(
        model_dir, TrainerConfig(), AlgoConfig(name="grpo"), iterations=1, temperature=1.0, seed=0, dtype=dtype
    )
    batch = load_batch(batch_path)
    version = int(batch.versions.max())
    process = psutil.Process()
    before = process.memory_info().rss
    highest, done = [before], threading.Event()

    def sample() -> None:
        while not done.wait(0.01):
            highest[0] = max(highest[0], process.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    trainer.train_on(batch, rollout_version=version)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    result = {
        "seconds": round(seconds, 3),
        "rss_before_bytes": before,
        "step_peak_rss_bytes": highest[0],
        "process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux: KiB
        "tokens": int(batch.loss_mask.sum()),
    }
    print(json.dumps(result), flush=True)
    shutdown()


if __name__ == "__main__":
    main()
