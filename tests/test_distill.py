"""Distillation from the unpruned model during CPT: the chunked KL, the loss, exactness, refusals."""

from __future__ import annotations

import signal
import subprocess
import weakref

import pytest
import torch
import torch.nn.functional as F

from data.config import ConfigError, load_config
from data.nll import IGNORE_INDEX
from tests.fixtures import ROOT
from tests.test_cpt import (
    COMMON,
    PREEMPTED,
    cpt_command,
    environment,
    exported_weights,
    rank_process,
    records,
    run_cpt,
    train_losses,
    wait_for_step,
)
from training.checkpoint import CheckpointStore
from training.config import CPTConfig
from training.distill import DistillLoss, TopK, chunked_kl, kd_positions, top_k_kl, top_k_mass
from training.run_dir import tag_for
from training.trainer import metric_value


def direct_kl(student: torch.Tensor, teacher: torch.Tensor, weights: torch.Tensor, temperature: float) -> torch.Tensor:
    log_t, log_s = F.log_softmax(teacher / temperature, -1), F.log_softmax(student / temperature, -1)
    return ((log_t.exp() * (log_t - log_s)).sum(-1) * weights).sum() / weights.sum()


@pytest.mark.parametrize("temperature, chunk", [(1.0, 16), (2.0, 7), (0.5, 1000)])
def test_chunked_kl_equals_the_direct_computation(temperature, chunk):
    generator = torch.Generator().manual_seed(0)
    student = (3 * torch.randn(12, 50, generator=generator)).requires_grad_()
    teacher = 3 * torch.randn(12, 50, generator=generator)
    weights = (torch.rand(12, generator=generator) > 0.3).float()
    got = chunked_kl(student, teacher, weights, temperature, chunk)
    expected = direct_kl(student, teacher, weights, temperature)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6), (float(got), float(expected))
    (grad_got,) = torch.autograd.grad(got, student)
    (grad_expected,) = torch.autograd.grad(expected, student)
    assert torch.allclose(grad_got, grad_expected, rtol=1e-4, atol=1e-7)
    assert not grad_got[weights == 0].any(), "rows without a label get no gradient"


def test_chunked_kl_keeps_the_student_dtype_and_is_zero_for_equal_logits():
    logits = torch.randn(4, 30, dtype=torch.bfloat16, requires_grad=True)
    kl = chunked_kl(logits, logits.detach().clone(), torch.ones(4), chunk=8)
    assert kl.dtype == torch.float32 and abs(float(kl)) < 1e-6
    kl.backward()
    assert logits.grad.dtype == torch.bfloat16 and float(logits.grad.abs().max()) < 1e-6


def direct_top_k_kl(student: torch.Tensor, teacher: torch.Tensor, weights: torch.Tensor, k: int,
                    temperature: float) -> torch.Tensor:
    """Both distributions over the full vocabulary with everything outside the teacher's top k masked out."""
    outside = torch.ones_like(teacher, dtype=torch.bool).scatter(-1, teacher.topk(k, dim=-1).indices, False)
    log_t = F.log_softmax((teacher / temperature).masked_fill(outside, float("-inf")), -1)
    log_s = F.log_softmax((student / temperature).masked_fill(outside, float("-inf")), -1)
    per_row = (log_t.exp() * (log_t - log_s)).masked_fill(outside, 0.0).sum(-1)
    return (per_row * weights).sum() / weights.sum()


@pytest.mark.parametrize("temperature, k", [(1.0, 5), (2.0, 17), (0.5, 2)])
def test_top_k_kl_equals_the_direct_computation(temperature, k):
    generator = torch.Generator().manual_seed(1)
    student = (3 * torch.randn(2, 6, 50, generator=generator)).requires_grad_()  # [batch, positions, vocab]
    teacher = 3 * torch.randn(2, 6, 50, generator=generator)
    weights = (torch.rand(12, generator=generator) > 0.3).float()
    top = teacher.topk(k, dim=-1)
    got = top_k_kl(student, top.values, top.indices, weights, temperature)
    expected = direct_top_k_kl(student, teacher, weights.reshape(2, 6), k, temperature)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6), (float(got), float(expected))
    (grad_got,) = torch.autograd.grad(got, student)
    (grad_expected,) = torch.autograd.grad(expected, student)
    assert torch.allclose(grad_got, grad_expected, rtol=1e-4, atol=1e-7)
    in_top_k = torch.zeros_like(teacher, dtype=torch.bool).scatter(-1, top.indices, True)
    assert not grad_got[~in_top_k].any(), "the student's logits outside the teacher's top k get no gradient"
    assert not grad_got.reshape(12, 50)[weights == 0].any(), "rows without a label get no gradient"
    # with k = the whole vocabulary it is the full KL
    full = teacher.topk(50, dim=-1)
    assert torch.allclose(top_k_kl(student, full.values, full.indices, weights, temperature),
                          chunked_kl(student.reshape(12, 50), teacher.reshape(12, 50), weights, temperature, 16),
                          rtol=1e-5)


def test_top_k_mass_is_the_teachers_probability_in_its_top_k():
    logits = torch.randn(3, 4, 40, generator=torch.Generator().manual_seed(2))
    values = logits.topk(6, dim=-1).values
    expected = F.softmax(logits / 2.0, -1).topk(6, dim=-1).values.sum(-1)
    assert torch.allclose(top_k_mass(logits, values, 2.0, chunk=7), expected, rtol=1e-5)


@pytest.mark.parametrize("top_k", [None, 8])
def test_top_k_keeps_only_k_of_the_teachers_logits_through_the_students_step(cpt_inputs, top_k):
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(cpt_inputs["model"])
    teacher = AutoModelForCausalLM.from_pretrained(cpt_inputs["model"]).eval()
    vocab = student.config.vocab_size
    ids = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[:, 5] = IGNORE_INDEX  # a document starts here: no target
    batch = {"input_ids": ids, "position_ids": torch.arange(12).repeat(2, 1), "labels": labels}
    seen = {}

    def watched_teacher(**inputs):  # the teacher, with a weak reference to its [batch, seq, vocab] logits
        output = teacher(**inputs)
        seen["logits"] = weakref.ref(output.logits)
        return output

    def at_the_students_forward(module, args):  # are the teacher's full logits still alive?
        seen["alive"] = seen["logits"]() is not None

    hook = student.register_forward_pre_hook(at_the_students_forward)
    loss_fn = DistillLoss(watched_teacher, alpha=0.25, temperature=2.0, chunk=1000, top_k=top_k)
    loss, metrics = loss_fn(student, batch)
    hook.remove()
    assert seen["alive"] == (top_k is None)  # with top_k only [tokens, k] of the teacher lives on
    with torch.no_grad():
        teacher_logits = teacher(input_ids=ids, position_ids=batch["position_ids"]).logits[:, :-1]
    student_logits = student(**batch).logits[:, :-1]
    weights = kd_positions(labels)
    if top_k:
        target = loss_fn.teacher_target(teacher_logits, weights)[0]
        assert isinstance(target, TopK) and target.values.shape == target.indices.shape == (2, 11, top_k)
        kd = direct_top_k_kl(student_logits, teacher_logits, weights.reshape(2, 11), top_k, 2.0)
        assert 0 < float(metrics["train.kd_top_k_mass"]) <= 1
    else:
        kd = direct_kl(student_logits.reshape(22, vocab), teacher_logits.reshape(22, vocab), weights, 2.0)
    assert float(metrics["train.kd"]) == pytest.approx(float(kd), rel=1e-5)
    assert float(loss) == pytest.approx(0.25 * float(metrics["train.ce"]) + 0.75 * 4 * float(kd), rel=1e-5)


def test_kd_positions_follow_the_labels_of_packed_documents():
    labels = torch.tensor([[5, 6, IGNORE_INDEX, 8], [IGNORE_INDEX, 1, 2, IGNORE_INDEX]])
    # logit i predicts label i+1: a document's first token (label -100) is never a KD target
    assert kd_positions(labels).tolist() == [1, 0, 1, 1, 1, 0]


class LigerStyle(torch.nn.Module):
    """A student whose forward behaves as Liger's fused-loss forward: given labels in training, it returns the
    loss and no logits (liger_kernel/transformers/model/llama.py, `skip_logits`)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.seen_labels = model, []

    def forward(self, labels=None, **inputs):
        self.seen_labels.append(labels is not None)
        output = self.model(labels=labels, **inputs)
        if labels is not None and self.training:
            output.logits = None
        return output

    @property
    def loss_function(self):
        return self.model.loss_function

    @property
    def config(self):
        return self.model.config


VOCAB = 100  # not the tiny models' hidden size (64): logits are told apart by their last dimension


def tiny_pair(dtype=torch.float32):
    from tests.tiny_models import make_tiny_model

    return make_tiny_model("llama", VOCAB, seed=1).to(dtype).train(), make_tiny_model("llama", VOCAB, seed=2).to(dtype)


def distill_batch():
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, 10] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels, "position_ids": torch.cat([torch.arange(10), torch.arange(14)]).repeat(2, 1)}


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_distill_loss_works_with_a_fused_loss_student(alpha):
    student, teacher = tiny_pair()
    engine, batch = LigerStyle(student), distill_batch()
    loss, metrics = DistillLoss(teacher, alpha, temperature=2.0, chunk=16)(engine, batch)
    assert engine.seen_labels == [False], "the student runs without labels: its logits always come back"
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        s, t = (model(**inputs, use_cache=False).logits for model in (student, teacher))
        kd = direct_kl(s[:, :-1].reshape(-1, VOCAB), t[:, :-1].reshape(-1, VOCAB), kd_positions(batch["labels"]), 2.0)
        ce = F.cross_entropy(s[:, :-1].reshape(-1, VOCAB), batch["labels"][:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
    assert float(loss) == pytest.approx(float(alpha * ce + (1 - alpha) * 4 * kd), rel=1e-4)
    assert isinstance(metrics["train.kd"], torch.Tensor)  # read by the trainer after the step, not here
    assert metric_value(metrics["perf.teacher_s"]) > 0
    assert ("train.ce" in metrics) is (alpha > 0)
    loss.backward()
    assert all(p.grad is not None for p in student.parameters())


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_alpha_zero_keeps_no_fp32_copy_of_the_logits(alpha):
    """bf16 training: the cross-entropy's fp32 log-softmax ([tokens, vocab]) is built only when alpha > 0."""
    student, teacher = tiny_pair(torch.bfloat16)
    kept = []

    def pack(t):
        if t.dtype == torch.float32 and t.dim() and t.shape[-1] == VOCAB and t.numel() >= 2 * 23 * VOCAB:
            kept.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        DistillLoss(teacher, alpha, temperature=1.0, chunk=16)(student, distill_batch())
    assert bool(kept) is (alpha > 0), kept


def test_a_teacher_with_another_tokenizer_is_refused(cpt_inputs, tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    from training.cpt import plan_cpt
    from training.distributed import WorldInfo

    teacher = tmp_path / "teacher"
    AutoModelForCausalLM.from_pretrained(cpt_inputs["model"]).save_pretrained(teacher)
    other = type(tokenizer).from_pretrained(cpt_inputs["model"])
    other.add_tokens(["<a token the student never saw>"])
    other.save_pretrained(teacher)
    config = load_config(CPTConfig, None, [f"model={cpt_inputs['model']}", f"data.path={cpt_inputs['tokens']}",
                                           f"output_dir={tmp_path / 'run'}", *COMMON, f"distill.teacher={teacher}"])
    with pytest.raises(ConfigError, match="another tokenizer than the student"):
        plan_cpt(config, WorldInfo(0, 0, 1))


def test_a_top_k_of_one_or_above_the_vocabulary_is_refused(cpt_inputs, tmp_path):
    from training.cpt import plan_cpt
    from training.distributed import WorldInfo

    run = [f"model={cpt_inputs['model']}", f"data.path={cpt_inputs['tokens']}", f"output_dir={tmp_path / 'run'}",
           *COMMON, f"distill.teacher={cpt_inputs['model']}"]
    with pytest.raises(ConfigError, match="distill.top_k must be at least 2"):
        load_config(CPTConfig, None, [*run, "distill.top_k=1"])
    with pytest.raises(ConfigError, match="distill.top_k=50000 is more than the teacher's 49152 logits"):
        plan_cpt(load_config(CPTConfig, None, [*run, "distill.top_k=50000"]), WorldInfo(0, 0, 1))
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.timeout(900)  # two launches
def test_alpha_one_is_plain_cpt_bitwise(cpt_inputs, tmp_path):
    """With alpha=1 the KL term weighs nothing: losses and final weights equal plain CPT's bit for bit."""
    plain, distilled = tmp_path / "plain", tmp_path / "distilled"
    run_cpt(cpt_inputs, plain, "train_steps=4", nprocs=1)
    run_cpt(cpt_inputs, distilled, "train_steps=4", f"distill.teacher={cpt_inputs['model']}", "distill.alpha=1",
            nprocs=1)
    assert train_losses(distilled) == train_losses(plain)
    kd = [r["train.kd"] for r in records(distilled) if "train.kd" in r]
    assert len(kd) == 4 and kd[0] == 0.0 and max(kd) > 0, "the KL is computed (and grows as the student moves)"
    for name, tensor in exported_weights(plain, 4).items():
        assert torch.equal(exported_weights(distilled, 4)[name], tensor), name


def state_shapes(checkpoint) -> dict[str, object]:
    """Per DeepSpeed state file of a checkpoint: the model's tensors by name and shape, or the shapes of the
    optimizer's fp32 partitions. A teacher in the engine or the optimizer would add to them."""
    shapes = {}
    for path in sorted(checkpoint.glob("*.pt")):
        state = torch.load(path, weights_only=False, map_location="cpu")
        shapes[path.name] = ({name: tuple(t.shape) for name, t in state["module"].items()} if "module" in state else
                             [tuple(t.shape) for t in state["optimizer_state_dict"]["single_partition_of_fp32_groups"]])
    return shapes


@pytest.mark.slow
@pytest.mark.timeout(1200)  # four launches
def test_a_distilled_run_resumes_bitwise_on_two_ranks(cpt_inputs, cpt_reference, tmp_path):
    distill = [f"distill.teacher={cpt_inputs['model']}", "distill.temperature=2", "distill.alpha=0.5",
               "distill.chunk=5000"]
    reference = tmp_path / "reference"
    run_cpt(cpt_inputs, reference, *distill)
    logged = [r for r in records(reference) if "train.loss" in r]
    assert all({"train.ce", "train.kd", "perf.teacher_s", "perf.teacher_fraction"} <= set(r) for r in logged)
    run_dir = tmp_path / "run"
    launcher = subprocess.Popen(cpt_command(cpt_inputs, run_dir, *distill), env=environment(), cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_step(run_dir, 3, launcher)
    rank_process(launcher, 0).send_signal(signal.SIGUSR1)
    output, _ = launcher.communicate(timeout=300)
    assert launcher.returncode == PREEMPTED, output[-3000:]
    stopped = CheckpointStore(run_dir / "checkpoints", 0, 10, 0).latest().step
    # the teacher is in no checkpoint: the same state, tensor for tensor, as plain CPT's of the same student
    assert state_shapes(run_dir / "checkpoints" / tag_for(stopped)) == state_shapes(
        cpt_reference / "checkpoints" / tag_for(2))
    run_cpt(cpt_inputs, run_dir, *distill)
    assert 3 <= stopped < max(train_losses(reference))
    assert train_losses(run_dir) == train_losses(reference)
    for name, tensor in exported_weights(reference).items():
        assert torch.equal(exported_weights(run_dir)[name], tensor), name

    # ZeRO-3 partitions the teacher like the student: the same first step, to the reduction order's rounding
    zero3 = tmp_path / "zero3"
    run_cpt(cpt_inputs, zero3, *distill, "zero_stage=3", "checkpoint.every_steps=0", "checkpoint.export_at_end=false",
            "validation.every_steps=0", "train_steps=2")
    first = {name: [r[name] for r in records(zero3) if r.get("step") == 1 and name in r][0]
             for name in ("train.ce", "train.kd")}
    assert first == pytest.approx({name: logged[0][name] for name in first}, rel=1e-4)
