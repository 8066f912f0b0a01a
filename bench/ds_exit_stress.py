"""Run the ZeRO-3 + CPU-offload two-process training run of the test suite N times and count
the runs that do not end cleanly (a rank aborting at exit: "terminate called without an
active exception", exit -6, or any non-zero exit).

    python bench/ds_exit_stress.py --runs 30          # prints one line per run and a summary

Each run trains the tiny random-weight model 3 steps on the shipped SFT sample, as
tests/test_train.py::test_deepspeed_two_processes_match_one does.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--stage", type=int, default=3)
    ap.add_argument("--offload", type=int, default=1)
    args = ap.parse_args(argv)
    from rwkvforge.checkpoint import save_pth
    from rwkvforge.data.prepare import Options, run
    from rwkvforge.demo import make_random_model_sd
    from rwkvforge.paths import sample_data_dir

    tmp = Path(tempfile.mkdtemp(prefix="ds-stress-"))
    model = tmp / "tiny.pth"
    save_pth(make_random_model_sd(2, 128, seed=0), model)
    prefix = tmp / "bsl_sft"
    run(Options(input=sample_data_dir() / "bsl_sft.jsonl", prefix=prefix, data_type="sft",
                ctx_len=64, seed=42, val_fraction=0.1, workers=1, progress=False),
        log=lambda *a: None)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB", "RWKVFORGE_"))}
    env.update({"OMP_NUM_THREADS": "1", "RWKVFORGE_ROOT": str(ROOT), "PYTHONUNBUFFERED": "1",
                "PYTHONFAULTHANDLER": "1"})
    bad = 0
    for i in range(args.runs):
        cmd = [sys.executable, "-m", "rwkvforge.train", "--base-model", str(model),
               "--data-prefix", str(prefix), "--runs-dir", str(tmp / "runs"),
               "--run-name", f"r{i}", "--precision", "fp32", "--no-progress",
               "--ctx-len=48", "--lora-r=8", "--lora-alpha=16", "--warmup-steps=2",
               "--head-chunk=256", "--log-every=1", "--eval-every=0", "--max-steps=3",
               "--save-every=0", "--micro-bsz=1", f"--deepspeed-stage={args.stage}",
               f"--deepspeed-offload={args.offload}", "--num-gpus=2"]
        t0 = time.time()
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        aborted = "terminate called" in r.stderr or r.returncode != 0
        bad += aborted
        status = (tmp / "runs" / f"r{i}" / "status.json")
        state = status.read_text().split('"state": "')[1].split('"')[0] if status.is_file() \
            else "-"
        print(f"run {i + 1:2d}: exit {r.returncode:4d} status {state:8s} "
              f"{'ABORT' if aborted else 'ok':5s} {time.time() - t0:5.1f}s", flush=True)
        if aborted:
            print("  " + "\n  ".join(r.stderr.strip().splitlines()[-15:]), flush=True)
    print(f"{bad} of {args.runs} runs did not end cleanly (stage {args.stage}, offload "
          f"{args.offload})")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
