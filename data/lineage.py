"""Which blocks of the original model a checkpoint's blocks are: `lineage.json`, carried from stage to stage.

A pruned checkpoint, and every CPT export of it, holds

  {"original_model": "lmsys/vicuna-7b-v1.3", "original_num_blocks": 32,
   "blocks": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11, ...],   # the original index of each block here, in order
   "prunes": [{"criterion": "ppl", "removed": [10, 12, ...]}, ...]}   # each prune, in the original numbering

so a second prune of it (iterative pruning: prune, distil, prune again) reports what it removes in
the original model's numbering as well as its input's. A checkpoint without the file is an original
model: its blocks are 0..n-1.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from data.artifacts import write_json_atomic

LINEAGE_FILE = "lineage.json"


@dataclass(frozen=True)
class Lineage:
    original_model: str
    original_num_blocks: int
    blocks: list[int]
    prunes: list[dict] = field(default_factory=list)

    @classmethod
    def of(cls, model_path: str | Path, num_blocks: int, name: str) -> Lineage:
        """The lineage of the checkpoint at `model_path` (`name`: how the config named it) with `num_blocks`."""
        path = Path(model_path) / LINEAGE_FILE
        if not path.is_file():
            return cls(name, num_blocks, list(range(num_blocks)))
        lineage = cls(**json.loads(path.read_text()))
        if len(lineage.blocks) != num_blocks:
            raise ValueError(f"{path} lists {len(lineage.blocks)} blocks but the model has {num_blocks}: the file "
                             "belongs to another checkpoint; remove it to number this model's blocks from 0")
        return lineage

    def original(self, blocks: list[int]) -> list[int]:
        """These blocks of this checkpoint, in the original model's numbering."""
        return [self.blocks[i] for i in blocks]

    def after_prune(self, removed: list[int], criterion: str) -> Lineage:
        gone = set(removed)
        return replace(self, blocks=[b for i, b in enumerate(self.blocks) if i not in gone],
                       prunes=[*self.prunes, {"criterion": criterion, "removed": self.original(sorted(removed))}])

    def write(self, directory: Path) -> None:
        write_json_atomic(Path(directory) / LINEAGE_FILE, asdict(self))


def copy_lineage(source: str | Path, directory: Path) -> None:
    """Carry the source checkpoint's lineage into `directory` (nothing to carry for an original model)."""
    path = Path(source) / LINEAGE_FILE
    if path.is_file():
        shutil.copyfile(path, Path(directory) / LINEAGE_FILE)
