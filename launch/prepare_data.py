"""Tokenize a corpus (SlimPajama .jsonl.zst, .jsonl, .txt) into token shards with a manifest.

  python launch/prepare_data.py --config configs/data/<recipe>.yaml [key=value ...]

Re-running continues where a run stopped. For a Slurm array, run each task with
shard_index=$SLURM_ARRAY_TASK_ID num_shards=N, then once with merge=true.
"""

from __future__ import annotations

import json
import logging
import sys

from data.cli import cli_config, run_main
from data.prepare import PrepareConfig, describe_sets, prepare


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    config = cli_config(PrepareConfig, __doc__, argv)
    path = prepare(config)
    manifest = json.loads(path.read_text())
    for split, entry in manifest["splits"].items():
        print(f"{split}: {entry['documents']:,} documents, {entry['tokens']:,} tokens in {len(entry['shards'])} shards")
    print(describe_sets(manifest))
    skipped = {k: v for k, v in manifest["skipped"].items() if v}
    if skipped:
        print(f"skipped records: {skipped}")
    print(f"manifest: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, sys.argv[1:]))
