"""Sheared-LLaMA's dynamic batch loading: the mixture moves toward the sets whose held-out loss is furthest
above a reference loss.

Every `update_every` steps (not at step 0): with the held-out loss l_i of each set i (`SetLosses`) and its
reference r_i, gap_i = l_i - r_i (clipped at 0 with `clip_gaps`, as the paper's Algorithm 1 writes it),

    w_i <- w_i exp(eta gap_i) / sum_j w_j exp(eta gap_j),   then   w_i <- (1 - c) w_i + c / k

(Xia et al., "Sheared LLaMA", ICLR 2024, Algorithm 1; the constants eta = 1 and c = 1e-4, after DoReMi, and the
unclipped gap are those of princeton-nlp/LLM-Shearing's `DynamicLoadingCallback.update_proportion`, update_type
"doremi"). The new weights reach the loader from the next step on and live in its state, so a checkpoint holds
them and a resumed run continues with exactly them.

The reference: the config's `data.dynamic.reference` (Sheared-LLaMA predicts each set's loss of a model of the
pruned size from scaling laws fitted on the LLaMA2 family), or by default the unpruned model's own held-out loss
per set, measured once before training on the same held-out sequences, written to the run directory
(`mixture_reference.json`) and reused by every later start of the run.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from data.artifacts import write_json_atomic
from data.config import ConfigError
from data.loader import GlobalBatchLoader
from data.mixture import normalized
from data.packed import PackedSequences
from data.shards import Manifest
from training.config import CPTConfig
from training.distributed import WorldInfo
from training.preflight import check_model_path, load_tokenizer
from training.validation import SetLosses

REFERENCE_FILE = "mixture_reference.json"


def update_weights(weights: dict[str, float], losses: dict[str, float], reference: dict[str, float],
                   eta: float = 1.0, smoothing: float = 1e-4, clip_gaps: bool = False) -> dict[str, float]:
    """One exponentiated-gradient step of the weights toward the sets with the largest loss gap."""
    names = sorted(weights)
    gaps = torch.tensor([losses[n] - reference[n] for n in names], dtype=torch.float64)
    if clip_gaps:
        gaps = gaps.clamp_min(0)
    logits = torch.log(torch.tensor([weights[n] for n in names], dtype=torch.float64)) + eta * gaps
    updated = (1 - smoothing) * torch.softmax(logits, dim=0) + smoothing / len(names)
    updated = updated / updated.sum()
    return dict(zip(names, updated.tolist(), strict=True))


class DynamicMixture:
    """A periodic evaluation of the trainer that updates the loader's mixture weights and logs them. It steers
    the sets the mixture starts with a weight on; the others keep none."""

    name = "mixture"

    def __init__(self, held_out: SetLosses, loader: GlobalBatchLoader, reference: dict[str, float], every: int,
                 eta: float, smoothing: float, clip_gaps: bool):
        self.held_out, self.loader, self.reference, self.every = held_out, loader, reference, every
        self.eta, self.smoothing, self.clip_gaps = eta, smoothing, clip_gaps
        self.sets = dynamic_sets(loader.weights)

    def __call__(self, engine) -> dict[str, float]:
        if engine.global_steps == 0:  # the starting point; the first update is at update_every
            logged = {f"mixture.reference.{n}": self.reference[n] for n in self.sets}
        else:
            losses, weights = self.held_out.losses(engine), self.loader.weights
            steered = update_weights({n: weights[n] for n in self.sets}, losses, self.reference, self.eta,
                                     self.smoothing, self.clip_gaps)
            self.loader.set_weights({**weights, **steered})
            logged = {f"mixture.gap.{n}": losses[n] - self.reference[n] for n in self.sets}
        weights = self.loader.weights
        return {**{f"mixture.weight.{n}": weights[n] for n in self.sets}, **logged}


def dynamic_sets(weights: dict[str, float]) -> list[str]:
    """The sets a dynamic mixture steers: those it starts with a weight on."""
    return sorted(name for name, w in weights.items() if w > 0)


def stored_reference(run_dir: Path, identity: dict) -> dict[str, float] | None:
    """The reference measured by an earlier start of this run, if it was measured for the same inputs."""
    path = run_dir / REFERENCE_FILE
    if not path.exists():
        return None
    stored = json.loads(path.read_text())
    return stored["losses"] if stored.get("identity") == identity else None


def measure_reference(model, held_out: SetLosses, run_dir: Path, identity: dict, rank: int) -> dict[str, float]:
    """The reference model's held-out loss per set, written to the run directory by rank 0."""
    losses = {name: nll / tokens for name, (nll, tokens) in held_out.measure(model).items()}
    if rank == 0:
        write_json_atomic(run_dir / REFERENCE_FILE, {"identity": identity, "losses": losses,
                                                     "perplexity": {n: math.exp(v) for n, v in losses.items()}})
    return losses


@dataclass
class MixturePlan:
    """What `plan_cpt` settled about a mixture before launch: the starting weights over every set of the
    training split, the model to measure the reference on (dynamic, none given) and what to tell the user."""

    weights: dict[str, float]
    reference_model: str | None
    notes: list[str]


def plan_mixture(config: CPTConfig, world: WorldInfo, tokenizer, total_steps: int) -> MixturePlan | None:
    """Refuse, before launch, a mixture the data cannot serve: a set it does not have, a weight on a set without
    one training sequence, and for a dynamic mixture a set without held-out sequences for every rank or
    without a reference. Natural: None."""
    data = config.data
    if data.mixture == "natural":
        return None
    train = PackedSequences(data.path, data.seq_len, "train", by_set=True)
    counts = {name: len(items) for name, items in train.set_ranges.items()}
    dynamic = data.mixture == "dynamic"
    key, spec = ("data.dynamic.initial", data.dynamic.initial) if dynamic else ("data.mixture", data.mixture)
    if spec == "natural":
        usable = {name: train.set_tokens[name] for name, count in counts.items() if count}
        weights = normalized({name: usable.get(name, 0) for name in counts})
    else:
        unknown = sorted(set(spec) - set(counts))
        if unknown:
            raise ConfigError(f"{key} names source set(s) {', '.join(unknown)} that {data.path} does not have; its "
                              f"sets are {', '.join(sorted(counts))}")
        empty = [name for name in sorted(spec) if spec[name] > 0 and not counts[name]]
        if empty:
            raise ConfigError(f"{key} gives a weight to {empty[0]}, which has {train.set_tokens[empty[0]]:,} training "
                              f"tokens, fewer than one sequence of {data.seq_len}: leave it out of {key}")
        weights = normalized({name: spec.get(name, 0.0) for name in counts})
    reference_model = _plan_dynamic(config, world, tokenizer, sorted(n for n, w in weights.items() if w > 0)) \
        if dynamic else None
    return MixturePlan(weights, reference_model, _describe(config, train, weights, counts, total_steps))


def _plan_dynamic(config: CPTConfig, world: WorldInfo, tokenizer, sets: list[str]) -> str | None:
    """Held-out sequences of every steered set for every rank, and a reference: given, or a model to measure."""
    data, sequences = config.data, config.validation.per_set()
    if "validation" not in Manifest.load(data.path).data["splits"]:
        raise ConfigError(f"data.mixture=dynamic steers by each set's held-out loss, and {data.path} has no "
                          "validation split: prepare the data with validation_fraction > 0")
    if sequences < world.world_size:
        raise ConfigError(f"data.mixture=dynamic measures each set on validation.set_sequences={sequences} held-out "
                          f"sequences: give it at least one per rank ({world.world_size})")
    held_out = PackedSequences(data.path, data.seq_len, "validation", by_set=True)
    for name in sets:
        count = len(held_out.set_ranges.get(name, ()))
        if count < world.world_size:
            raise ConfigError(f"data.mixture=dynamic: source set {name} has {count} held-out sequences of "
                              f"{data.seq_len} tokens, fewer than one per rank ({world.world_size}): hold out more "
                              "text (validation_fraction), or give it no weight in data.dynamic.initial")
    reference = data.dynamic.reference
    if reference:
        missing, extra = sorted(set(sets) - set(reference)), sorted(set(reference) - set(held_out.set_ranges))
        if missing or extra:
            raise ConfigError(f"data.dynamic.reference must give a loss for each set the mixture steers ({', '.join(sets)})"
                              + (f"; it lacks {', '.join(missing)}" if missing else "")
                              + (f"; the data has no set {', '.join(extra)}" if extra else ""))
        return None
    name = data.dynamic.reference_model or _pruned_from(config.model, config.trust_remote_code)
    if name is None:
        raise ConfigError("data.mixture=dynamic needs a reference loss per set: data.dynamic.reference={set: loss, "
                          "...}, or data.dynamic.reference_model=<the unpruned model> (the default, the model named "
                          f"in {config.model}/pruning_report.json, is not there)")
    path = check_model_path(name, config.trust_remote_code)
    if load_tokenizer(path).get_vocab() != tokenizer.get_vocab():
        raise ConfigError(f"data.dynamic.reference_model {name} has another tokenizer than the model: its loss "
                          "would be measured on other tokens; use the model this one was pruned from")
    return path


def _pruned_from(model: str, trust_remote_code: bool) -> str | None:
    """The model a pruned checkpoint was pruned from, as its pruning_report.json names it."""
    report = Path(check_model_path(model, trust_remote_code)) / "pruning_report.json"
    return json.loads(report.read_text()).get("model") if report.is_file() else None


def _describe(config: CPTConfig, train: PackedSequences, weights: dict[str, float], counts: dict[str, int],
              total_steps: int) -> list[str]:
    """One line per set: its weight against its natural share, and (static) how many epochs of it the run takes."""
    data, batch = config.data, config.global_batch
    total = sum(train.set_tokens.values())
    kind = "dynamic, starting from" if data.mixture == "dynamic" else "static"
    notes = [f"data mixture ({kind} weights by training tokens) over {sum(w > 0 for w in weights.values())} of "
             f"{len(weights)} source sets:"]
    for name, weight in weights.items():
        line = (f"  {name}: weight {weight:.4f} (natural {train.set_tokens[name] / total:.4f}), "
                f"{counts[name]:,} sequences of {data.seq_len}")
        if weight > 0 and data.mixture != "dynamic":
            epochs = weight * batch * total_steps / counts[name]
            line += f", {epochs:.2f} epochs of it over the {total_steps:,} steps"
            if epochs > 1:
                line += (f": it runs out at about step {int(counts[name] / (weight * batch)) + 1:,}, and the run "
                         "stops there (data.on_exhausted=stop)" if data.on_exhausted == "stop"
                         else ", each epoch in a new order (data.on_exhausted=wrap)")
        notes.append(line)
    return notes
