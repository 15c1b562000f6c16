"""Everything GPU-only in one command of a few minutes: `make gpu-check` (or `python tests/gpu_check.py`).

On a CUDA GPU: the gpu-marked tests (`pytest -m gpu` with SHORTEN_GPU_TESTS=1, so the GPUs are visible and
only those run: tests/test_gpu.py), then tests/benchmarks/bench_gpu.py on the largest shape that fits, within
a budget that keeps the whole check under 8 minutes on one H100. What it writes goes under $OUT when set (else
outputs/gpu-check/): gpu_check.log (everything printed), gpu_tests.xml (JUnit), bench_gpu.json and
gpu_check.json (the device, library versions, test counts, the benchmark's table). Exit code 0 when every
test passed and every benchmark path ran and agreed with the reference.

Without a CUDA GPU it says what a GPU run needs, then smoke-runs the same script on the CPU: the gpu tests
are collected and skipped, the benchmark runs its tiny shape on two paths; exit code 0 when that works.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEADLINE_S = 450  # the whole check, on one H100
NEEDS = """A GPU run of `make gpu-check` needs:
  - a CUDA GPU of compute capability 8.0 or more (flash kernels: A100, H100, H200...)
  - torch >= 2.10 with torch.nn.attention.varlen (the lent machines have 2.11) and transformers >= 5.17
  - deepspeed (plus hjson and pydantic where missing); liger-kernel for the Liger path, flash-attn for
    flash_attention_2 (each path without its package is skipped and named)
On a lent H100/H200 without network: build the wheels here with `make gpu-wheels`, carry `.whl`, and run the
command in README.md, "On a GPU"."""


def library_versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "transformers", "deepspeed", "liger-kernel", "flash-attn", "triton"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


class Log:
    """Prints and keeps everything in gpu_check.log."""

    def __init__(self, path: Path):
        self.file = path.open("w")

    def __call__(self, text: str) -> None:
        print(text, flush=True)
        self.file.write(text + "\n")
        self.file.flush()

    def run(self, command: list[str], env: dict[str, str], timeout: float) -> int:
        self(f"$ {' '.join(command)}")
        process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True)
        started = time.monotonic()
        for line in process.stdout:
            self(line.rstrip())
            if time.monotonic() - started > timeout:
                process.kill()
                self(f"stopped after {timeout:.0f} s")
        return process.wait()


def test_counts(xml_path: Path) -> dict[str, int]:
    if not xml_path.exists():
        return {}
    suite = ElementTree.parse(xml_path).getroot()
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    return {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}


def main() -> int:
    out = Path(os.environ.get("OUT") or ROOT / "outputs" / "gpu-check")
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / "gpu_check.log")
    missing = [name for name in ("torch", "transformers", "deepspeed") if importlib.util.find_spec(name) is None]
    if missing:
        log(f"missing packages: {', '.join(missing)}\n{NEEDS}")
        return 2
    import torch

    started = time.monotonic()
    gpu = torch.cuda.is_available()
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "PYTHONUNBUFFERED": "1"}
    if gpu:
        env.update(SHORTEN_GPU_TESTS="1", DS_ACCELERATOR="cuda")
        log(f"GPU check on {torch.cuda.get_device_name(0)}: {json.dumps(library_versions())}")
    else:
        log(f"no CUDA GPU here: a CPU smoke run of this script follows.\n{NEEDS}")
    xml_path = out / "gpu_tests.xml"
    tests_code = log.run([sys.executable, "-m", "pytest", "tests/test_gpu.py", "-m", "gpu", "-p", "no:cacheprovider",
                          "-q", "-rs", f"--junitxml={xml_path}"], env, timeout=240)
    bench_json = out / "bench_gpu.json"
    budget = max(60.0, DEADLINE_S - (time.monotonic() - started) - 90)
    bench = [sys.executable, "tests/benchmarks/bench_gpu.py", "--json", str(bench_json), "--budget-s", f"{budget:.0f}"]
    bench_code = log.run(bench if gpu else [*bench, "--tiny", "--paths", "varlen,varlen+liger"], env,
                         timeout=DEADLINE_S)
    counts = test_counts(xml_path)
    summary = {"gpu": torch.cuda.get_device_name(0) if gpu else None, "versions": library_versions(),
               "tests": counts, "tests_exit_code": tests_code, "bench_exit_code": bench_code,
               "bench": json.loads(bench_json.read_text()) if bench_json.exists() else None,
               "seconds": round(time.monotonic() - started)}
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=1))
    tests_ok = tests_code == 0 or (not gpu and tests_code == 5)  # 5: every gpu test deselected or skipped
    log(f"gpu-check {'on ' + summary['gpu'] if gpu else '(CPU smoke run)'}: tests {counts or tests_code}, "
        f"benchmark exit code {bench_code}, {summary['seconds']} s; results in {out}")
    return 0 if tests_ok and bench_code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
