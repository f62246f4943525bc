"""Time TRL's data preparation of Capybara-like rows in one process and in several (CPU).

The dataWorkers lever tokenizes a dataset of 4,000 rows or more in several processes
(`dataset_num_proc`) and packs it in one (sftjob_trainer/prepared_rows.py). This runs that
preparation (`prepare_counting`: tokenize, count, pack bfd to 2,048) on ROWS text rows of
the reference job's length spread (log-normal around 1,100 tokens, the e2e bench's rows)
with the bench's tiny tokenizer, datasets' cache off, alternating one process and
PROCESSES, twice each; prints the seconds of each run and checks that the packed rows are
the same. Session 15's figure is in docs/performance.md (the dataWorkers row).

    python3 bench/tokenizing_processes.py [--rows 8000] [--processes 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "trainer_image"), str(ROOT / "operator")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8000)
    parser.add_argument("--processes", type=int, default=2)
    options = parser.parse_args()

    from datasets import Dataset, disable_caching
    from sftjob_bench.common import TINY, build_model
    from sftjob_bench.e2e import CAPYBARA_SIGMA, row_lengths, write_rows
    from sftjob_trainer.prepared_rows import _PreparationOnly, prepare_counting
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    disable_caching()  # each run tokenizes afresh (the cache's key ignores num_proc)
    work = Path(tempfile.mkdtemp(prefix="tokenizing-"))
    build_model(work / "model", TINY)
    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    write_rows(work / "rows.jsonl", tokenizer, row_lengths(options.rows, 1100, CAPYBARA_SIGMA))
    data = Dataset.from_list([json.loads(line) for line in (work / "rows.jsonl").open()])

    seconds: dict[str, list[float]] = {}
    packed = set()
    for processes in (None, options.processes) * 2:
        args = SFTConfig(
            output_dir=str(work / "out"),
            max_length=2048,
            packing=True,
            packing_strategy="bfd",
            dataset_num_proc=processes,
            use_cpu=True,
            bf16=False,
            report_to=[],
        )
        preparer = _PreparationOnly(tokenizer, args, data[0])
        start = time.perf_counter()
        rows, _ = prepare_counting(
            lambda *call: SFTTrainer._prepare_dataset(preparer, *call),  # noqa: B023
            data,
            tokenizer,
            args,
            True,
            None,
            "train",
        )
        seconds.setdefault(str(processes or 1), []).append(round(time.perf_counter() - start, 2))
        packed.add(json.dumps(rows[:]["seq_lengths"]))
    print(json.dumps({"rows": options.rows, "seconds": seconds, "same_rows": len(packed) == 1}))


if __name__ == "__main__":
    main()
