"""Benchmark: what DATA_TYPE=auto costs - its key scan (data/detect.py) and `prepare` with
auto, against `prepare --type text` on the same file in the same run (the peer). The scan
reads every record's keys once, in one process, before tokenizing; the target, with one
worker, is a scan under a third of a prepare's wall time and an auto prepare within 1.35x of
the explicit one (with more workers the prepare gets faster and the scan does not: set
DATA_TYPE explicitly to skip it on a large corpus). Both prepares must
write the same bytes (the make_data.py-identical binidx does not depend on how the type was
chosen).

    python bench/detect_bench.py                    # synthetic 1C/RU/EN/ZH corpus, 16 MiB
    python bench/detect_bench.py --mb 32 --workers 2
    python bench/detect_bench.py --input data/samples/bsl_code.jsonl
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from prepare_bench import synthetic_corpus

from rwkvforge.data.detect import auto_type, scan
from rwkvforge.data.prepare import Options, run


def _best(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", type=Path, help="a text JSONL (default: synthetic corpus)")
    ap.add_argument("--mb", type=float, default=16.0, help="synthetic corpus size in MiB")
    ap.add_argument("--rounds", type=int, default=3, help="runs of each (best one counts)")
    ap.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmpd = Path(tmp)
        src = args.input
        if src is None:
            src = tmpd / "corpus.jsonl"
            synthetic_corpus(src, args.mb)
        mib = src.stat().st_size / 2**20

        def prepare(kind: str) -> None:
            run(Options(input=src, prefix=tmpd / kind, data_type=kind, val_fraction=0.0,
                        workers=args.workers, progress=False), log=lambda *a: None)

        prepare("text")  # warm the page cache and the tokenizer tables
        t_scan = _best(lambda: auto_type(scan(src)), args.rounds)
        t_text = _best(lambda: prepare("text"), args.rounds)
        t_auto = _best(lambda: prepare("auto"), args.rounds)
        same = all((tmpd / f"auto{s}").read_bytes() == (tmpd / f"text{s}").read_bytes()
                   for s in (".bin", ".idx"))
    print(f"input: {src.name}, {mib:.1f} MiB, {args.workers} worker(s), best of {args.rounds}")
    print(f"key scan (DATA_TYPE=auto)   {mib / t_scan:8.1f} MiB/s")
    print(f"prepare --type text (peer)  {mib / t_text:8.1f} MiB/s")
    print(f"prepare --type auto         {mib / t_auto:8.1f} MiB/s")
    print(f"scan / prepare text:  {t_scan / t_text:.3f}  (target < 0.33)")
    print(f"prepare auto / text:  {t_auto / t_text:.3f}  (target < 1.35)")
    print(f"same bytes: {'yes' if same else 'NO'}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
