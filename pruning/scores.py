"""Block importance criteria. Every scorer returns one float per block: higher = more important.

All criteria see the same calibration batch (LongTensor [samples, seq_len]).

- `ppl`: perplexity of the calibration set with the block removed (the paper's PPL criterion).
  Computed without rebuilding anything: one forward of the full model caches every block's input;
  "without block i" then runs only blocks i+1.. from block i's cached input, through the model's
  own forward (masks, rotary tables, final norm, head, soft-capping and loss all stay the model's).
  Blocks before i are skipped, so a full scan does about half the block computations of
  rebuilding each candidate and running it whole (`ppl_scores_rebuild`, kept as the reference).
- `taylor`: sum over the block's weights of |dL/dW_ij * W_ij| element by element (first-order Taylor
  estimate of the loss change, the paper's formula and the official code). Each gradient is folded
  in the moment it is ready and then freed: the full set of gradients is never held at once.
- `mag`: sum of |W| over the block's weights.
- `block_influence`: ShortGPT's Block Influence, mean over tokens of 1 - cos(block input, output).

With `unit=module` the candidates are the blocks' attention and MLP sub-layers (pruning/modules.py):
`module_ppl_scores` runs block i on its cached input with one of its sub-layers skipped, then blocks
i+1.. as above; `taylor` and `mag` sum over each unit's own weights (the sub-layer and its norms)
instead of the block's (`groups`). Block influence compares a block's input and output and has no
sub-layer form.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from data.nll import TokenNLL
from pruning.layers import find_decoder_layers, rebuild_without
from pruning.modules import Unit, all_units, skipped_units, units_skipped


def _batches(calibration: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return list(calibration.split(batch_size))


def _add_nll(nll: TokenNLL, model: nn.Module, input_ids: torch.Tensor) -> None:
    nll.add(model(input_ids=input_ids, labels=input_ids, use_cache=False).loss, input_ids)


class _Skip(nn.Module):
    """Stands in for a block that is absent: passes the hidden states through."""

    def __init__(self, block: nn.Module, tuple_output: bool):
        super().__init__()
        self.tuple_output = tuple_output
        if hasattr(block, "attention_type"):
            self.attention_type = block.attention_type

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        return (hidden_states,) if self.tuple_output else hidden_states


class _ReplayThrough(_Skip):
    """Stands in for block i: runs it on its cached input, as if blocks 0..i-1 had run."""

    def __init__(self, block: nn.Module, cached: torch.Tensor):
        super().__init__(block, False)
        self.block = block
        self.cached = cached

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        return self.block(self.cached, *args, **kwargs)


class _Replay(_Skip):
    """Stands in for block i: emits the cached input of block i, as if blocks 0..i-1 had run."""

    def __init__(self, block: nn.Module, tuple_output: bool, cached: torch.Tensor):
        super().__init__(block, tuple_output)
        self.cached = cached

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        return (self.cached,) if self.tuple_output else self.cached


@contextlib.contextmanager
def _layers_replaced(model: nn.Module, replacement: list[nn.Module]) -> Iterator[None]:
    path, layers = find_decoder_layers(model)
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, nn.ModuleList(replacement))
    try:
        yield
    finally:
        setattr(parent, attr, layers)


def _hidden_from(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


@torch.no_grad()
def capture_block_io(model: nn.Module, input_ids: torch.Tensor, removed: Sequence[int] = ()
                     ) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None], bool]:
    """Run the model once (with `removed` blocks skipped) and return every block's input and output.

    Also reports whether blocks return a tuple (older transformers) or a tensor.
    """
    _, layers = find_decoder_layers(model)
    inputs: list[torch.Tensor | None] = [None] * len(layers)
    outputs: list[torch.Tensor | None] = [None] * len(layers)
    tuple_output = [False]
    handles = []
    for index, block in enumerate(layers):
        if index in removed:
            continue

        def pre_hook(module, args, kwargs, index=index):
            inputs[index] = _hidden_from(args, kwargs).detach()

        def post_hook(module, args, kwargs, output, index=index):
            tuple_output[0] = isinstance(output, tuple)
            outputs[index] = (output[0] if isinstance(output, tuple) else output).detach()

        handles.append(block.register_forward_pre_hook(pre_hook, with_kwargs=True))
        handles.append(block.register_forward_hook(post_hook, with_kwargs=True))
    try:
        replacement = [_Skip(b, False) if i in removed else b for i, b in enumerate(layers)]
        with _layers_replaced(model, replacement):
            model(input_ids=input_ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return inputs, outputs, tuple_output[0]


@torch.no_grad()
def ppl_scores(model: PreTrainedModel, calibration: torch.Tensor, batch_size: int = 10,
               removed: Sequence[int] = (), progress: bool = True) -> list[float]:
    """Calibration perplexity without each block (already `removed` blocks stay out; they get nan)."""
    _, layers = find_decoder_layers(model)
    n = len(layers)
    nll = [TokenNLL() for _ in range(n)]
    candidates = [i for i in range(n) if i not in removed]
    bar = tqdm(total=len(candidates) * math.ceil(len(calibration) / batch_size), desc="ppl criterion",
               disable=not progress, leave=False)
    for batch in _batches(calibration, batch_size):
        inputs, _, tuple_output = capture_block_io(model, batch, removed)
        for i in candidates:
            replacement = [
                _Replay(block, tuple_output, inputs[i]) if j == i
                else _Skip(block, tuple_output) if j < i or j in removed
                else block
                for j, block in enumerate(layers)
            ]
            with _layers_replaced(model, replacement):
                _add_nll(nll[i], model, batch)
            bar.update()
    bar.close()
    return [nll[i].perplexity if i in candidates else math.nan for i in range(n)]


@torch.no_grad()
def module_ppl_scores(model: PreTrainedModel, calibration: torch.Tensor, modules: dict, batch_size: int = 10,
                      removed: Sequence[Unit] = (), progress: bool = True) -> list[float]:
    """Calibration perplexity without each attention and MLP sub-layer, in `all_units` order (units already
    gone, from the checkpoint or `removed`, get nan). Blocks before the unit's are skipped: its block runs
    from its cached input with the unit left out."""
    _, layers = find_decoder_layers(model)
    units = all_units(len(layers))
    gone = set(skipped_units(model)) | set(removed)
    candidates = [unit for unit in units if unit not in gone]
    nll = {unit: TokenNLL() for unit in candidates}
    bar = tqdm(total=len(candidates) * math.ceil(len(calibration) / batch_size), desc="ppl criterion (modules)",
               disable=not progress, leave=False)
    with units_skipped(model, removed, modules):
        for batch in _batches(calibration, batch_size):
            inputs, _, tuple_output = capture_block_io(model, batch)
            for unit in candidates:
                i = unit[0]
                replacement = [_Skip(block, tuple_output) if j < i else _ReplayThrough(block, inputs[i]) if j == i
                               else block for j, block in enumerate(layers)]
                with units_skipped(model, [unit], modules), _layers_replaced(model, replacement):
                    _add_nll(nll[unit], model, batch)
                bar.update()
    bar.close()
    return [nll[unit].perplexity if unit in nll else math.nan for unit in units]


@torch.no_grad()
def ppl_scores_rebuild(model: PreTrainedModel, calibration: torch.Tensor, batch_size: int = 10,
                       progress: bool = True, blocks: Sequence[int] | None = None) -> list[float]:
    """The paper's method: rebuild the model without block i and run it whole, for every i
    (or for the given `blocks` only)."""
    _, layers = find_decoder_layers(model)
    scores = []
    for i in tqdm(blocks if blocks is not None else range(len(layers)), desc="ppl (rebuild)",
                  disable=not progress, leave=False):
        candidate = rebuild_without(model, [i])
        nll = TokenNLL()
        for batch in _batches(calibration, batch_size):
            _add_nll(nll, candidate, batch)
        scores.append(nll.perplexity)
        del candidate
    return scores


@torch.no_grad()
def calibration_perplexity(model: nn.Module, calibration: torch.Tensor, batch_size: int = 10) -> float:
    nll = TokenNLL()
    for batch in _batches(calibration, batch_size):
        _add_nll(nll, model, batch)
    return nll.perplexity


def iterative_ppl_order(model: PreTrainedModel, calibration: torch.Tensor, num_remove: int,
                        protected: Sequence[int], batch_size: int = 10, progress: bool = True
                        ) -> tuple[list[int], list[list[float]]]:
    """SLEB-style greedy removal: remove the block whose absence hurts least, rescore, repeat.

    Returns the removal order and the scores of every round (nan for blocks already removed).
    """
    removed: list[int] = []
    rounds = []
    for _ in tqdm(range(num_remove), desc="iterative ppl", disable=not progress):
        scores = ppl_scores(model, calibration, batch_size, removed=removed, progress=False)
        rounds.append(scores)
        eligible = [i for i in range(len(scores)) if i not in removed and i not in protected]
        removed.append(min(eligible, key=lambda i: scores[i]))
    return removed, rounds


def iterative_module_order(model: PreTrainedModel, calibration: torch.Tensor, modules: dict, target,
                           batch_size: int = 10, progress: bool = True) -> tuple[list[Unit], list[list[float]]]:
    """The same greedy removal over attention and MLP sub-layers, while `target` (a
    `pruning.selection.ModuleTarget`) takes more. Returns the removal order and each round's scores."""
    removed: list[Unit] = []
    rounds = []
    with tqdm(desc="iterative ppl (modules)", disable=not progress) as bar:
        while True:
            scores = module_ppl_scores(model, calibration, modules, batch_size, removed=removed, progress=False)
            units = all_units(len(scores) // 2)
            ranked = sorted((u for u in target.candidates if u not in removed),
                            key=lambda u: (scores[units.index(u)], units.index(u)))
            if not ranked or not target.fits(removed, ranked[0]):
                break
            rounds.append(scores)
            removed.append(ranked[0])
            bar.update()
    if not removed:
        target.take(ranked)  # raises: not even the least important module fits the target
    return removed, rounds


def _block_weights(block: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Weights (matrices and norm scales) of a block; biases are left out, as in the paper."""
    return [(name, p) for name, p in block.named_parameters() if name.endswith("weight")]


def taylor_scores(model: PreTrainedModel, calibration: torch.Tensor, batch_size: int = 10,
                  groups: list[list[nn.Parameter]] | None = None) -> list[float]:
    """The official Taylor block score: sum over the block's weights of |sum_batches W * dL/dW|, element
    by element (shortened-llm src/anal_block_sensitivity_taylor.py, the paper's formula).

    One batch (the official default, 10 x 128): each gradient is reduced to one number in its
    post-accumulate hook and freed, so no gradient set is ever held. Several batches (e.g. the
    official Vicuna-7B script's batch size 1): the signed products must be summed before abs(),
    so one fp32 buffer per block weight is kept (the size of the block weights in fp32); each
    gradient is still freed as soon as it is folded in. As in the official code each batch's own
    mean loss is differentiated and the products are summed over batches. `groups`: the weights of
    each unit to score (default: each block's).
    """
    groups = groups if groups is not None else _block_groups(model)
    batches = _batches(calibration, batch_size)
    was_training = model.training
    model.eval()
    saved_flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    scores = [0.0] * len(groups)
    salience: dict[int, torch.Tensor] = {}
    owner: dict[int, int] = {}
    handles = []

    def reduce_and_free(param: torch.Tensor) -> None:
        product = param.detach().float() * param.grad.float()
        if len(batches) == 1:
            scores[owner[id(param)]] += float(product.abs().sum())
        elif id(param) in salience:
            salience[id(param)] += product
        else:
            salience[id(param)] = product
        param.grad = None

    for index, weights in enumerate(groups):
        for param in weights:
            param.requires_grad_(True)
            owner[id(param)] = index
            handles.append(param.register_post_accumulate_grad_hook(reduce_and_free))
    try:
        for batch in tqdm(batches, desc="taylor criterion", leave=False):
            model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in saved_flags.items():
            p.requires_grad_(flag)
            p.grad = None
        model.train(was_training)
    for key, total in salience.items():
        scores[owner[key]] += float(total.abs().sum())
    return scores


def _block_groups(model: nn.Module) -> list[list[nn.Parameter]]:
    return [[p for _, p in _block_weights(block)] for block in find_decoder_layers(model)[1]]


@torch.no_grad()
def magnitude_scores(model: PreTrainedModel, groups: list[list[nn.Parameter]] | None = None) -> list[float]:
    """Sum of |W| over each block's weights (or each group's)."""
    groups = groups if groups is not None else _block_groups(model)
    return [float(sum(p.detach().abs().float().sum() for p in weights)) for weights in groups]


@torch.no_grad()
def block_influence_scores(model: PreTrainedModel, calibration: torch.Tensor, batch_size: int = 10
                           ) -> list[float]:
    """ShortGPT Block Influence from block inputs/outputs caught by hooks (not `hidden_states`,
    whose last entry HF takes after the final norm)."""
    _, layers = find_decoder_layers(model)
    total = torch.zeros(len(layers), dtype=torch.float64)
    tokens = 0
    for batch in _batches(calibration, batch_size):
        inputs, outputs, _ = capture_block_io(model, batch)
        for i in range(len(layers)):
            cosine = torch.nn.functional.cosine_similarity(inputs[i].float(), outputs[i].float(), dim=-1)
            total[i] += (1 - cosine).sum().double()
        tokens += batch.numel()
    return (total / tokens).tolist()
