"""At real sizes (the 2021 HW7 files of ../shared): a second predict / evaluate reads the cached
window logits with no more memory than the first, and writes the same files.

Each command runs in a child process that reports its own peak memory (ru_maxrss).
"""
import os
import re
import resource
import subprocess
import sys

import pytest

from conftest import ROOT, shared_path
from hw7qa.__main__ import main

PEAK_MB = 3000          # the first predict of the 2021 test file peaks at about 1,400 MB on CPU
REPORT_PEAK = ("import resource, sys; from hw7qa.__main__ import main; rc = main(sys.argv[1:]); "
               "print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")


def cap_address_space():
    # a regression then fails with MemoryError instead of filling the machine's memory
    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))


def peak_mb(*args: str) -> float:
    """Run ``python -m hw7qa *args`` in a child on the CPU; its peak resident memory in MB."""
    # one thread: on a busy 2-core machine torch's threads wait on each other for minutes
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    child = subprocess.run([sys.executable, "-c", REPORT_PEAK, *args], cwd=ROOT, capture_output=True, text=True,
                           env=env, preexec_fn=cap_address_space)
    assert child.returncode == 0, child.stderr[-3000:]
    return int(re.search(r"^MAXRSS (\d+)$", child.stdout, re.M).group(1)) / 1024     # Linux: KiB


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("real") / "run"
    assert main(["demo", "--output-dir", str(run), "--set", "epochs=1", "test_file=", "keep_checkpoints=0"]) == 0
    return run


@pytest.mark.parametrize("command, file, written, extra", [
    ("predict", "data/hw7-2021/hw7_test.json", "result-hw7_test.csv", []),
    ("evaluate", "data/hw7-2021/hw7_dev.json", "dev_predictions-hw7_dev.jsonl", []),
    # two sets of windows (doc_stride 48 and 96), voted at the character level
    ("predict", "data/hw7-2021/hw7_test.json", "result-hw7_test.csv", ["tta_strides=96"]),
])
def test_second_call_reads_the_cache_in_bounded_memory_and_writes_the_same(run_dir, command, file, written, extra):
    # large batches: fewer forward passes of the tiny model (the logits, and so the cache, are the same)
    args = [command, str(run_dir), "--file", str(shared_path(file)), "--set", "eval_batch_size=512", *extra]
    first = peak_mb(*args)
    first_bytes = (run_dir / written).read_bytes()
    second = peak_mb(*args)
    assert first < PEAK_MB and second <= 1.3 * first, (first, second)
    assert (run_dir / written).read_bytes() == first_bytes
