"""The mixture over source sets: sequences of one set, token shares per window, exact and O(1) resume on any
world size, sets that run out, the refusals before launch, dynamic batch loading, per-set validation.

The data is the CPT fixture's: the real C4 sample and Wikipedia paragraphs as RedPajamaC4 and
RedPajamaWikipedia; loader-level tests simulate ranks in one process, as the natural loader's tests do."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset
from transformers import AutoModelForCausalLM

from data.config import ConfigError, load_config
from data.loader import DataExhausted, GlobalBatchLoader
from data.mixture import MixtureState, SetMixture
from data.packed import PackedSequences
from data.shards import DataMismatchError, Manifest, set_ranges
from training.config import CPTConfig
from training.distributed import WorldInfo
from training.mixture import DynamicMixture, plan_mixture, update_weights
from training.validation import SetLosses, ValidationLoss

C4, WIKI = "RedPajamaC4", "RedPajamaWikipedia"
SEQ = 64


class Tagged(Dataset):
    """The by-set sequences, each with its index, so a test sees which set a sample came from."""

    def __init__(self, inner: PackedSequences):
        self.inner, self.set_ranges, self.fingerprint = inner, inner.set_ranges, inner.fingerprint

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {**self.inner[index], "index": torch.tensor(index)}


@pytest.fixture(scope="module")
def tokens(cpt_inputs):
    return cpt_inputs["tokens"]


@pytest.fixture(scope="module")
def by_set(tokens):
    return Tagged(PackedSequences(tokens, SEQ, by_set=True))


def set_of(dataset, index: int) -> str:
    return next(name for name, items in dataset.set_ranges.items() if index in items)


def steps(loader: GlobalBatchLoader, count: int) -> list[list[int]]:
    """Item indices of `count` global steps of this rank's loader."""
    batches = iter(loader)
    return [torch.cat([next(batches)["index"] for _ in range(loader.accumulation)]).tolist() for _ in range(count)]


def global_order(dataset, world_size: int, workers: int = 0, count: int = 4, state: dict | None = None,
                 weights=None, **kwargs) -> list[list[int]]:
    """Every rank's slice of `count` global steps, in rank order, as one list per step."""
    per_step = [[] for _ in range(count)]
    for rank in range(world_size):
        loader = GlobalBatchLoader(dataset, 16, 2, world_size, rank, seed=7, num_workers=workers,
                                   mixture=weights or {C4: 0.7, WIKI: 0.3}, **kwargs)
        if state is not None:
            loader.load_state_dict(state)
        for step, items in enumerate(steps(loader, count)):
            per_step[step] += items
    return per_step


def test_a_sets_sequences_are_its_documents_cut_in_order(tokens):
    """Sequence k of a set is tokens [k L, (k+1) L) of that set's documents, shard after shard: read here
    straight from the shard files by the set ranges their records give."""
    manifest = Manifest.load(tokens)
    dataset = PackedSequences(tokens, SEQ, by_set=True)
    for name in (C4, WIKI):
        stream = np.concatenate([np.fromfile(tokens / "train" / f"{shard['name']}.tokens", dtype=manifest.dtype)[a:b]
                                 for shard in manifest.shards("train") for s, a, b in set_ranges(shard) if s == name])
        assert len(stream) == dataset.set_tokens[name] and len(dataset.set_ranges[name]) == len(stream) // SEQ
        for k in (0, 1, len(dataset.set_ranges[name]) - 1):
            sample = dataset[dataset.set_ranges[name][k]]
            assert sample["input_ids"].tolist() == stream[k * SEQ:(k + 1) * SEQ].tolist()
            starts = (sample["position_ids"] == 0).nonzero().flatten()
            assert (sample["labels"][starts[starts > 0]] == -100).all()  # document masking, as in natural order
    natural = PackedSequences(tokens, SEQ)
    assert len(natural) == sum(dataset.set_tokens.values()) // SEQ >= len(dataset)


def test_token_shares_hold_in_every_window():
    """Five sets, weights changed twice mid-run: every window of 1 and of 3 global batches of 64 (and every
    rank's slice of 8) holds each set's tokens within 2 sequences of its weighted share."""
    ranges, start = {}, 0
    for name, count in zip("abcde", (5000, 300, 70, 2000, 900), strict=True):
        ranges[name], start = range(start, start + count), start + count
    mixture = SetMixture(ranges, seed=3)
    state = MixtureState({"a": 0.52, "b": 0.27, "c": 0.045, "d": 0.12, "e": 0.045})
    dealt, targets = [], []
    for step in range(150):
        if step in (50, 100):
            state = state.with_weights({"a": 0.1, "b": 0.1, "c": 0.5, "d": 0.2, "e": 0.1} if step == 50
                                       else {"a": 0.3, "b": 0.0, "c": 0.3, "d": 0.3, "e": 0.1})
        draw = mixture.draw(state, 64, step)
        dealt.append([next(n for n, r in ranges.items() if i in r) for i in draw.items.tolist()])
        targets.append(state.weights)
        state = draw.state
    for window in (1, 3):
        for first in range(len(dealt) - window + 1):
            names = [n for batch in dealt[first:first + window] for n in batch]
            for name in ranges:
                expected = sum(weights[name] for weights in targets[first:first + window]) * 64
                assert abs(names.count(name) - expected) < 2, (window, first, name)
    for batch, weights in zip(dealt, targets, strict=True):
        for rank in range(8):
            part = batch[rank * 8:(rank + 1) * 8]
            assert all(abs(part.count(n) - 8 * weights[n]) < 2 for n in ranges)
    assert "b" not in [n for batch in dealt[100:] for n in batch]  # a weight of 0 draws nothing


def test_loader_tokens_follow_the_weights(by_set):
    counts = {C4: 0, WIKI: 0}
    for items in global_order(by_set, 1, count=6, weights={C4: 0.25, WIKI: 0.75}):
        for index in items:
            counts[set_of(by_set, index)] += by_set[index]["input_ids"].numel()
    assert counts == {C4: 6 * 16 * SEQ // 4, WIKI: 6 * 16 * SEQ * 3 // 4}


def test_order_is_independent_of_world_size_and_workers(by_set):
    reference = global_order(by_set, 1)
    for world_size, workers in ((2, 0), (4, 0), (8, 0), (2, 2)):
        assert global_order(by_set, world_size, workers) == reference, (world_size, workers)


def test_resume_is_exact_on_another_world_size_and_costs_no_replay(by_set):
    loader = GlobalBatchLoader(by_set, 16, 2, seed=7, mixture={C4: 0.7, WIKI: 0.3})
    steps(loader, 2)
    state = loader.state_dict()
    assert state["mixture"]["drawn"] == {C4: 22, WIKI: 10} and len(json.dumps(state)) < 500
    uninterrupted = global_order(by_set, 1, count=5)
    assert global_order(by_set, 4, count=3, state=state) == uninterrupted[2:]
    far = {**state, "consumed_samples": 16 * 10**9, "mixture": {**state["mixture"], "drawn": {C4: 11 * 10**9,
                                                                                               WIKI: 5 * 10**9}}}
    assert len(global_order(by_set, 2, count=1, state=far)[0]) == 16  # arithmetic, not a replay of 1e9 steps
    with pytest.raises(DataMismatchError, match="keep data.mixture"):
        GlobalBatchLoader(PackedSequences(by_set.inner.manifest.directory, SEQ), 16, 2).load_state_dict(state)


def test_new_weights_apply_from_the_next_step_and_resume_exactly(by_set):
    """Set between steps (as the dynamic mixture does), with a worker prefetching under the old weights."""
    loader = GlobalBatchLoader(by_set, 16, 2, seed=7, num_workers=1, mixture={C4: 0.5, WIKI: 0.5})
    batches = iter(loader)
    for _ in range(2 * loader.accumulation):
        next(batches)
    loader.set_weights({C4: 0.125, WIKI: 0.875})
    state = loader.state_dict()
    after = [torch.cat([next(batches)["index"] for _ in range(loader.accumulation)]).tolist() for _ in range(3)]
    assert [sum(set_of(by_set, i) == WIKI for i in items) for items in after] == [14, 14, 14]
    assert global_order(by_set, 2, count=3, state=state, weights={C4: 0.5, WIKI: 0.5}) == after


@pytest.mark.parametrize("on_exhausted", ["wrap", "stop"])
def test_a_set_that_runs_out_wraps_to_a_new_order_or_stops(tokens, on_exhausted):
    dataset = Tagged(PackedSequences(tokens, 512, by_set=True))  # few long sequences: Wikipedia runs out soon
    wiki = dataset.set_ranges[WIKI]
    loader = GlobalBatchLoader(dataset, 16, 2, seed=1, mixture={C4: 0.5, WIKI: 0.5}, on_exhausted=on_exhausted)
    needed = -(-(2 * len(wiki) + 1) // 16)  # steps until the second epoch of Wikipedia has begun
    if on_exhausted == "stop":
        with pytest.raises(DataExhausted, match=f"source set {WIKI} has run out: all its {len(wiki)} sequences"):
            steps(loader, needed)
        assert loader.consumed_samples == 16 * (len(wiki) // 8)  # every step that had enough of it, no more
        return
    drawn = [i for items in steps(loader, needed) for i in items if i in wiki]
    first, second = drawn[:len(wiki)], drawn[len(wiki):2 * len(wiki)]
    assert sorted(first) == list(wiki) and first != second[:len(first)]
    notes = loader.pop_notes()
    assert len(notes) == 1 and f"source set {WIKI}: all its {len(wiki)} sequences trained on" in notes[0]
    assert "epoch 2 in a new order" in notes[0] and loader.pop_notes() == []


def plan_config(cpt_inputs, *overrides: str) -> CPTConfig:
    return load_config(CPTConfig, None, [f"model={cpt_inputs['model']}", f"data.path={cpt_inputs['tokens']}",
                                         "data.seq_len=64", "global_batch=8", "micro_batch=2", "train_steps=50",
                                         *overrides])


WORLD = WorldInfo(0, 0, 2)


@pytest.mark.parametrize("overrides, message", [
    (["data.mixture={RedPajamaC4: 0.5, RedPajamaBook: 0.5}"], "names source set.* RedPajamaBook that .* does not "
                                                             "have; its sets are RedPajamaC4, RedPajamaWikipedia"),
    (["data.seq_len=100000", "data.mixture={RedPajamaC4: 0.5, RedPajamaWikipedia: 0.5}"],
     "gives a weight to RedPajamaWikipedia, which has .* training tokens, fewer than one sequence of 100000"),
    (["data.mixture=dynamic", "data.dynamic.reference={RedPajamaC4: 3.0}"],
     "reference must give a loss for each set .* it lacks RedPajamaWikipedia"),
    (["data.mixture=dynamic"], "needs a reference loss per set.*pruning_report.json"),
    (["data.mixture=dynamic", "validation.set_sequences=1"], "at least one per rank"),
])
def test_mixtures_the_data_cannot_serve_are_refused_before_launch(cpt_inputs, overrides, message):
    with pytest.raises(ConfigError, match=message):
        plan_mixture(plan_config(cpt_inputs, *overrides), WORLD, None, 50)


@pytest.mark.parametrize("mixture, message", [
    ("{RedPajamaC4: 0.5, RedPajamaWikipedia: 0.4}", r"the weights sum to 0.9, not 1: e.g. \{RedPajamaC4: 0.5556"),
    ("{RedPajamaC4: -0.5, RedPajamaWikipedia: 1.5}", "the weight of RedPajamaC4 must be a number >= 0"),
    ("balanced", "'balanced' is not natural, dynamic or a mapping"),
])
def test_bad_weights_are_refused_by_the_config(cpt_inputs, mixture, message):
    with pytest.raises(ConfigError, match=message):
        plan_config(cpt_inputs, f"data.mixture={mixture}")


def test_the_plan_says_how_often_each_set_is_seen(cpt_inputs):
    plan = plan_mixture(plan_config(cpt_inputs, "data.mixture={RedPajamaC4: 0.2, RedPajamaWikipedia: 0.8}",
                                    "data.on_exhausted=stop", "train_steps=1000"), WORLD, None, 1000)
    assert plan.weights == {C4: 0.2, WIKI: 0.8} and plan.reference_model is None
    wiki = next(line for line in plan.notes if WIKI in line)
    assert "epochs of it over the 1,000 steps: it runs out at about step" in wiki and "the run stops there" in wiki
    natural = plan_mixture(plan_config(cpt_inputs, "data.mixture=dynamic", f"data.dynamic.reference_model="
                                       f"{cpt_inputs['model']}"), WORLD, _tokenizer(cpt_inputs), 50)
    counts = {n: len(r) for n, r in PackedSequences(cpt_inputs["tokens"], 64, by_set=True).set_ranges.items()}
    assert natural.weights[C4] == pytest.approx(counts[C4] / sum(counts.values()), abs=0.01)
    assert natural.reference_model == str(cpt_inputs["model"])


def _tokenizer(cpt_inputs):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(cpt_inputs["model"])


def test_the_update_is_sheared_llamas_and_moves_toward_the_largest_gap():
    weights, reference = {C4: 0.6, WIKI: 0.3, "RedPajamaBook": 0.1}, {C4: 2.0, WIKI: 2.0, "RedPajamaBook": 2.0}
    losses = {C4: 2.1, WIKI: 2.9, "RedPajamaBook": 1.5}
    updated = update_weights(weights, losses, reference)
    raw = {n: weights[n] * math.exp(losses[n] - reference[n]) for n in weights}  # Algorithm 1, then DoReMi's c
    expected = {n: (1 - 1e-4) * raw[n] / sum(raw.values()) + 1e-4 / 3 for n in weights}
    assert updated == pytest.approx(expected, rel=1e-12) and sum(updated.values()) == pytest.approx(1, abs=1e-15)
    assert updated[WIKI] > weights[WIKI] and updated["RedPajamaBook"] < weights["RedPajamaBook"]
    paper = update_weights(weights, losses, reference, smoothing=0, clip_gaps=True)  # max(gap, 0), no smoothing
    assert paper["RedPajamaBook"] / paper[C4] == pytest.approx(weights["RedPajamaBook"] / weights[C4] / math.exp(0.1))


@pytest.fixture(scope="module")
def tiny_model(cpt_inputs):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(cpt_inputs["model"]).eval()


def direct_loss(model, dataset: PackedSequences, indices) -> float:
    """Token-weighted held-out loss, one sequence per forward."""
    total = tokens = 0.0
    with torch.no_grad():
        for index in indices:
            sample = dataset[index]
            count = int((sample["labels"][1:] != -100).sum())
            total += float(model(**{k: v[None] for k, v in sample.items()}, use_cache=False).loss) * count
            tokens += count
    return total / tokens


def test_per_set_validation_equals_a_direct_computation(cpt_inputs, tiny_model):
    held_out = PackedSequences(cpt_inputs["tokens"], SEQ, "validation", by_set=True)
    ranks = [SetLosses(held_out, 6, 2, WorldInfo(rank, rank, 2)) for rank in range(2)]  # two ranks, summed by hand
    measured = [rank.measure(tiny_model) for rank in ranks]
    for name in (C4, WIKI):
        nll = sum(m[name][0] for m in measured) / sum(m[name][1] for m in measured)
        assert nll == pytest.approx(direct_loss(tiny_model, held_out, held_out.set_ranges[name][:6]), rel=1e-5)
    overall = PackedSequences(cpt_inputs["tokens"], SEQ, "validation")
    single = SetLosses(held_out, 6, 2, WorldInfo(0, 0, 1))
    results = ValidationLoss(overall, 4, 2, WorldInfo(0, 0, 1), 5, per_set=single)(tiny_model)
    assert results["val.loss"] == pytest.approx(direct_loss(tiny_model, overall, range(4)), rel=1e-5)
    for name in (C4, WIKI):
        expected = direct_loss(tiny_model, held_out, held_out.set_ranges[name][:6])
        assert results[f"val.loss.{name}"] == pytest.approx(expected, rel=1e-5)
        assert results[f"val.ppl.{name}"] == pytest.approx(math.exp(expected), rel=1e-5)


def test_dynamic_mixture_moves_toward_the_largest_gap_and_the_loader_resumes_it_exactly(cpt_inputs, tiny_model,
                                                                                         by_set):
    held_out = SetLosses(PackedSequences(cpt_inputs["tokens"], SEQ, "validation", by_set=True), 4, 2,
                         WorldInfo(0, 0, 1))
    losses = held_out.losses(tiny_model)
    reference = {C4: losses[C4] - 0.1, WIKI: losses[WIKI] - 0.5}  # Wikipedia is furthest above its reference
    loader = GlobalBatchLoader(by_set, 16, 2, seed=7, mixture={C4: 0.7, WIKI: 0.3})
    dynamic = DynamicMixture(held_out, loader, reference, every=3, eta=1.0, smoothing=1e-4, clip_gaps=False)
    tiny_model.global_steps = 0
    assert dynamic(tiny_model) == {f"mixture.weight.{C4}": 0.7, f"mixture.weight.{WIKI}": 0.3,
                                   f"mixture.reference.{C4}": reference[C4], f"mixture.reference.{WIKI}": reference[WIKI]}
    assert loader.weights == {C4: 0.7, WIKI: 0.3}  # no update at step 0
    batches = iter(loader)
    for _ in range(3 * loader.accumulation):
        next(batches)
    tiny_model.global_steps = 3
    logged = dynamic(tiny_model)
    assert loader.weights[WIKI] > 0.3 and logged[f"mixture.weight.{WIKI}"] == loader.weights[WIKI]
    assert logged[f"mixture.gap.{WIKI}"] == pytest.approx(0.5) and logged[f"mixture.gap.{C4}"] == pytest.approx(0.1)
    assert loader.weights == update_weights({C4: 0.7, WIKI: 0.3}, losses, reference)
    state = json.loads(json.dumps(loader.state_dict()))  # as a checkpoint stores it
    after = [torch.cat([next(batches)["index"] for _ in range(loader.accumulation)]).tolist() for _ in range(2)]
    assert global_order(by_set, 2, count=2, state=state) == after


@pytest.fixture(scope="module")
def small_mixture(cpt_inputs, tmp_path_factory):
    """The tiny model with a small two-set corpus: 60 C4 documents, 40 short Wikipedia paragraphs."""
    import textwrap

    from data.prepare import PrepareConfig, prepare
    from data.text import load_documents

    root = tmp_path_factory.mktemp("small-mixture")
    c4 = load_documents("embedded:c4_demo.jsonl")[:60]
    wiki = textwrap.wrap(load_documents("embedded:wiki_demo.txt")[0], 400)[:40]
    for name, docs in (("c4.jsonl", c4), ("wiki.jsonl", wiki)):
        (root / name).write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    prepare(load_config(PrepareConfig, None, [f"inputs=[{root / 'c4.jsonl'},{root / 'wiki.jsonl'}]",
                                              f"output_dir={root / 'tokens'}", f"tokenizer={cpt_inputs['model']}",
                                              "validation_fraction=0.2", "num_workers=1",
                                              "set_by_file={'c4*': RedPajamaC4, 'wiki*': RedPajamaWikipedia}"]))
    return {**cpt_inputs, "tokens": root / "tokens"}


@pytest.mark.slow
def test_a_dynamic_run_logs_its_weights_and_stops_where_a_set_runs_out(small_mixture, tmp_path, single_process_group,
                                                                       capsys):
    """In-process CPT (real DeepSpeed, one rank): the reference is the model's own loss, measured once and
    stored; weights and per-set losses are logged; Wikipedia runs out and the run ends there, checkpointed
    and exported; started again, it resumes with the stored weights and stops at once."""
    from training.checkpoint import CheckpointStore
    from training.cpt import build_cpt_trainer, plan_cpt
    from training.mixture import REFERENCE_FILE

    run_dir, inputs = tmp_path / "run", small_mixture
    config = load_config(CPTConfig, None, [
        f"model={inputs['model']}", f"data.path={inputs['tokens']}", f"output_dir={run_dir}",
        "data.seq_len=64", "global_batch=8", "micro_batch=4", "train_steps=40", "data.num_workers=0",
        "data.mixture=dynamic", "data.dynamic.initial={RedPajamaC4: 0.1, RedPajamaWikipedia: 0.9}",
        f"data.dynamic.reference_model={inputs['model']}", "data.dynamic.update_every=2", "optimizer.lr=3e-3",
        "data.on_exhausted=stop", "validation.every_steps=2", "validation.sequences=4", "validation.set_sequences=4",
        "checkpoint.every_steps=0", "checkpoint.every_minutes=0"])
    trainer = build_cpt_trainer(config, plan_cpt(config, single_process_group), should_stop=lambda: False)
    assert trainer.train() == "data exhausted"
    stopped = trainer.step
    output = capsys.readouterr().out
    assert "reference loss per set" in output and f"stopping after step {stopped}: source set {WIKI} has run out" in output
    logged: dict[int, dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        logged.setdefault(record["step"], {}).update(record)
    weights = {step: r[f"mixture.weight.{WIKI}"] for step, r in logged.items() if f"mixture.weight.{WIKI}" in r}
    assert sorted(weights) == list(range(0, stopped + 1, 2)) and weights[0] == 0.9 and len(set(weights.values())) > 2
    assert all(f"val.loss.{C4}" in logged[step] and f"mixture.gap.{WIKI}" in logged[step] for step in weights if step)
    reference = json.loads((run_dir / REFERENCE_FILE).read_text())["losses"]
    for name in (C4, WIKI):  # the reference model is the model at step 0: no gap yet
        assert logged[0][f"val.loss.{name}"] == pytest.approx(reference[name], rel=1e-6)
        assert logged[0][f"mixture.reference.{name}"] == reference[name]
    checkpoint = CheckpointStore(run_dir / "checkpoints", 0, 2, 0).latest()
    assert checkpoint.step == stopped and (run_dir / "exports" / checkpoint.tag).is_dir()
    state = checkpoint.metadata()["loader"]["mixture"]
    wiki = len(PackedSequences(inputs["tokens"], 64, by_set=True).set_ranges[WIKI])
    assert state["drawn"][WIKI] <= wiki < state["drawn"][WIKI] + 8 * state["weights"][WIKI] + 2

    again = build_cpt_trainer(config, plan_cpt(config, single_process_group), should_stop=lambda: False)
    assert again.loader.weights == state["weights"] and again.step == stopped
    assert again.train() == "data exhausted" and again.step == stopped
    assert "reference loss per set" not in capsys.readouterr().out  # measured once, read back


def test_tokens_of_the_previous_format_are_refused_with_the_fix(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "shorten-tokens/2"}))
    with pytest.raises(DataMismatchError, match=r"format 'shorten-tokens/2', expected 'shorten-tokens/3' \(documents grouped "
                                        r"by source set.*tokenize the data again"):
        PackedSequences(tmp_path, 64)
