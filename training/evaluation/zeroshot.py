"""Zero-shot accuracy with lm-eval, the paper's way, standalone or inside a distributed training run.

The paper reports seven commonsense tasks by their lm-eval names: acc_norm for HellaSwag, ARC-c and
OBQA, acc for BoolQ, PIQA, WinoGrande and ARC-e, and the plain average of the seven.

Standalone runs use lm-eval's own `HFLM`. Inside training the model is a DeepSpeed engine whose
ZeRO-3 parameters exist only as shards: every rank must run the same number of forward passes or
the parameter gathers hang. `ShardedLM` therefore splits lm-eval's log-likelihood requests evenly
over the ranks (padding the last share), scores its share with fixed-size batches through the
engine, and all-gathers the results, so every rank hands lm-eval the full list and computes the
same metrics; no consolidated copy of the model is ever built.
"""

from __future__ import annotations

import difflib
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM

from data.config import ConfigError

# we hand lm-eval an in-memory model on purpose: its two notes about that, once per model, are noise
IN_MEMORY_MODEL_NOTES = ("kwarg is not of type", "Passed an already-initialized model")
logging.getLogger("lm_eval.models.huggingface").addFilter(
    lambda record: not any(note in record.getMessage() for note in IN_MEMORY_MODEL_NOTES))

ACC_NORM_TASKS = frozenset({"hellaswag", "arc_challenge", "openbookqa"})


class TaskUnavailableError(ValueError):
    """A task name lm-eval does not know, or a task whose data cannot be loaded here."""


def task_manager(include_path: Path | None):
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise ConfigError(f"zero-shot include_path {include_path} is not a directory of lm-eval task YAML files")
    return TaskManager(include_path=str(include_path) if include_path else None)


def load_tasks(names: Sequence[str], include_path: Path | None) -> dict:
    """lm-eval task objects, datasets loaded: fails here, before any model work, if one is missing."""
    manager = task_manager(include_path)
    known = set(manager.all_tasks)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            raise TaskUnavailableError(
                f"unknown lm-eval task {name!r}" + (f" (did you mean {', '.join(close)}?)" if close else "")
                + "; for a task of your own, put its YAML in a directory and set include_path to it")
    try:
        return manager.load(list(names))
    except Exception:  # datasets raises many kinds when the hub is out of reach: find the task to blame
        for name in names:
            try:
                manager.load([name])
            except Exception as err:
                raise TaskUnavailableError(
                    f"task {name!r} cannot load its data ({err.__class__.__name__}: {str(err)[:200]}): without "
                    "the Hugging Face hub, point the task at local files (a task YAML with dataset_path: json and "
                    "dataset_kwargs.data_files, in include_path) or fill the datasets cache first") from err
        raise


def headline(task: str, metrics: dict) -> tuple[str, float]:
    """The metric the paper reports for a task: acc_norm for HellaSwag/ARC-c/OBQA, else acc."""
    preferred = ("acc_norm", "acc") if task in ACC_NORM_TASKS else ("acc", "acc_norm")
    for name in preferred:
        if f"{name},none" in metrics:
            return name, float(metrics[f"{name},none"])
    for key, value in metrics.items():  # any other task: its first numeric metric
        if "," in key and "stderr" not in key and isinstance(value, (int, float)):
            return key.split(",")[0], float(value)
    raise TaskUnavailableError(f"task {task!r} reported no metric")


def summarize(results: dict, names: Sequence[str]) -> dict:
    """{task: {metric, value, stderr}} plus the average of the headline values, as the paper's tables."""
    rows = {}
    for name in names:
        metrics = results["results"][name]
        metric, value = headline(name, metrics)
        stderr = metrics.get(f"{metric}_stderr,none")
        rows[name] = {"metric": metric, "value": value,
                      "stderr": float(stderr) if isinstance(stderr, (int, float)) else None}
    return {"tasks": rows, "average": sum(r["value"] for r in rows.values()) / len(rows)}


def run_tasks(lm, tasks: dict, names: Sequence[str], limit: int | None = None,
              log_samples: bool = False) -> dict:
    from lm_eval.evaluator import evaluate as lm_eval_evaluate

    for task in tasks["tasks"].values():
        task.set_config(key="num_fewshot", value=0)
    results = lm_eval_evaluate(lm, tasks, limit=limit, bootstrap_iters=0, log_samples=log_samples,
                               verbosity="WARNING")
    summary = summarize(results, names)
    if log_samples:
        summary["samples"] = results["samples"]
    return summary


def starts_with_bos(lm: TemplateLM) -> bool:
    """Whether the requests lm-eval builds through `lm` begin with a BOS token (recorded with the scores)."""
    bos = lm.tokenizer.bos_token_id
    return bos is not None and lm.tok_encode("The")[:1] == [bos]


class ShardedLM(TemplateLM):
    """lm-eval log-likelihoods computed across data-parallel ranks through any forward function."""

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], tokenizer, device: torch.device,
                 batch_size: int = 8, max_length: int = 2048, add_bos_token: bool | None = None):
        super().__init__()
        self.forward, self.tokenizer, self.target_device = forward, tokenizer, device
        self.add_bos_token = add_bos_token  # as lm-eval's HFLM: None = the tokenizer's default
        self.batch_size, self.max_length = batch_size, max_length
        self.shard_rank = dist.get_rank() if dist.is_initialized() else 0
        self.shard_count = dist.get_world_size() if dist.is_initialized() else 1

    # lm-eval must not shard the requests itself: each rank sees them all, we split them below
    @property
    def rank(self) -> int:
        return 0

    @property
    def world_size(self) -> int:
        return 1

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        if add_special_tokens is None:
            add_special_tokens = self.add_bos_token
        options = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return self.tokenizer.encode(string, **options)

    def _loglikelihood_tokens(self, requests, **kwargs) -> list[tuple[float, bool]]:
        per_rank = math.ceil(len(requests) / self.shard_count)
        mine = list(requests[self.shard_rank * per_rank:(self.shard_rank + 1) * per_rank])
        mine += [requests[0]] * (per_rank - len(mine))  # equal work per rank: ZeRO-3 gathers collectively
        scores = []
        for start in range(0, per_rank, self.batch_size):
            scores.extend(self._score([(r[1], r[2]) for r in mine[start:start + self.batch_size]]))
        local = torch.tensor(scores, dtype=torch.float64, device=self.target_device).view(-1, 2)
        if self.shard_count > 1:
            gathered = [torch.empty_like(local) for _ in range(self.shard_count)]
            dist.all_gather(gathered, local)
            local = torch.cat(gathered)
        return [(float(ll), bool(greedy)) for ll, greedy in local[:len(requests)].tolist()]

    @torch.no_grad()
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, float]]:
        """Sum of log p(continuation | context) and whether it is the greedy continuation, per pair."""
        windows = [(context + continuation)[-(self.max_length + 1):][:-1] for context, continuation in pairs]
        width = max(len(w) for w in windows)
        batch = torch.zeros(len(windows), width, dtype=torch.long)  # right padding is invisible to causal attention
        for row, window in enumerate(windows):
            batch[row, :len(window)] = torch.tensor(window)
        logprobs = F.log_softmax(self.forward(batch.to(self.target_device)).float(), dim=-1).cpu()
        results = []
        for row, ((_, continuation), window) in enumerate(zip(pairs, windows, strict=True)):
            positions = logprobs[row, len(window) - len(continuation):len(window)]
            target = torch.tensor(continuation)
            results.append((float(positions.gather(1, target[:, None]).sum()),
                            float(bool((positions.argmax(-1) == target).all()))))
        return results

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        """lm-eval's, with its progress bar on rank 0 only (lm-eval passes `disable` explicitly)."""
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or self.shard_rank != 0)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError("perplexity tasks run through training/evaluation/perplexity.py, not lm-eval")

    def generate_until(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError("generation tasks are not part of the zero-shot evaluation")


class ZeroShotEvaluation:
    """The trainer's periodic zero-shot evaluation: lm-eval tasks scored through the live engine."""

    name = "zeroshot"

    def __init__(self, tasks: dict, names: Sequence[str], tokenizer, every: int, batch_size: int,
                 max_length: int, limit: int | None, add_bos_token: bool | None = None):
        self.tasks, self.names, self.tokenizer, self.every = tasks, list(names), tokenizer, every
        self.batch_size, self.max_length, self.limit = batch_size, max_length, limit
        self.add_bos_token = add_bos_token

    def __call__(self, engine) -> dict[str, float]:
        engine.eval()
        lm = ShardedLM(lambda ids: engine(input_ids=ids, use_cache=False).logits, self.tokenizer, engine.device,
                       self.batch_size, self.max_length, self.add_bos_token)
        summary = run_tasks(lm, self.tasks, self.names, limit=self.limit)
        engine.train()
        return {**{f"zeroshot.{task}": row["value"] for task, row in summary["tasks"].items()},
                "zeroshot.average": summary["average"]}
