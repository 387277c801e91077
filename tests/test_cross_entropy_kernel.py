"""cross_entropy_kernel.py: the Triton kernel against the plain-torch reference, values and gradients.

On the CPU the kernel runs through Triton's interpreter, which must be switched on before Triton is imported:
so those checks run in a fresh Python. On a machine with a GPU the same checks run on it, at GPT-2's sizes."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="Triton is not installed (pip install triton)")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


def run_interpreted(script):
    """Run script in a fresh Python with Triton's CPU interpreter on; fail with its output if it fails."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=REPO,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


# Shared by the interpreted and the GPU checks: (rows, vocab) shapes that cover a vocabulary under one
# 4,096-column trip, exactly one, and several with a ragged last trip; logits far from zero so the max matters.
CHECK_KERNEL = """
import torch, torch.nn.functional as F
import cross_entropy_kernel as ck
device = {device!r}
for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
    for seed, (rows, vocab) in enumerate([(5, 1000), (4, 4096), (3, 9000), {big}]):
        generator = torch.Generator().manual_seed(seed)
        logits = (torch.randn(rows, vocab, generator=generator) * 4 + 30).to(device, dtype)
        targets = torch.randint(0, vocab, (rows,), generator=generator).to(device)
        exact = F.cross_entropy(logits.double(), targets, reduction="sum")
        exact_grad = torch.softmax(logits.double(), 1) - F.one_hot(targets, vocab).double()
        for grad_scale in (1.0, 1024.0):
            by_kernel, by_reference = logits.clone(), logits.clone()
            loss = ck.kernel(by_kernel, targets, grad_scale, needs_grad=True)
            ck.reference(by_reference, targets, grad_scale, needs_grad=True)
            assert abs(loss.item() - exact.item()) <= 1e-5 * abs(exact.item()), (dtype, rows, vocab, loss, exact)
            error = (by_kernel.double() / grad_scale - exact_grad).norm() / exact_grad.norm()
            assert error < tolerance, (dtype, rows, vocab, grad_scale, error.item())
            # as close to the reference as the dtype's rounding allows
            assert (by_kernel.double() - by_reference.double()).abs().max() <= 2 * grad_scale * tolerance
        untouched = logits.clone()
        loss = ck.kernel(untouched, targets, needs_grad=False)
        assert torch.equal(untouched, logits), "an evaluation must leave the logits as they were"
        assert abs(loss.item() - exact.item()) <= 1e-5 * abs(exact.item())
print("ok")
"""


@needs_triton
def test_kernel_matches_reference_on_cpu_interpreter():
    assert run_interpreted(CHECK_KERNEL.format(device="cpu", big=(2, 10000))).strip() == "ok"


@needs_triton
def test_chunked_loss_through_kernel_matches_cross_entropy_on_cpu_interpreter():
    script = """
import torch, torch.nn.functional as F
import cross_entropy_kernel as ck
from cross_entropy_kernel import linear_cross_entropy
ck.kernel_runs_on = lambda device: True  # the interpreter runs the kernel on CPU tensors
calls = []
kernel = ck.kernel
ck.kernel = lambda *args: calls.append(1) or kernel(*args)
generator = torch.Generator().manual_seed(0)
x = torch.randn(37, 16, generator=generator, requires_grad=True)
weight = torch.randn(300, 16, generator=generator, requires_grad=True)
targets = torch.randint(0, 300, (37,), generator=generator)
loss = linear_cross_entropy(x, weight, targets, chunk_size=10)
loss.backward()
x2, weight2 = x.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
expected = F.cross_entropy(x2 @ weight2.T, targets)
expected.backward()
assert len(calls) == 4, calls  # four chunks of 10 rows or fewer, each through the kernel
assert torch.allclose(loss, expected, rtol=1e-5), (loss, expected)
assert torch.allclose(x.grad, x2.grad, atol=1e-6) and torch.allclose(weight.grad, weight2.grad, atol=1e-6)
# a head with a bias and a soft-cap: the kernel takes the capped logits, the cap's gradient applied after it
bias = torch.randn(300, generator=generator, requires_grad=True)
inputs = (x, weight, bias)
loss = linear_cross_entropy(x, weight, targets, chunk_size=10, bias=bias, softcap=5.0)
expected = F.cross_entropy(5.0 * torch.tanh((x @ weight.T + bias) / 5.0), targets)
assert len(calls) == 8, calls
assert torch.allclose(loss, expected, rtol=1e-5), (loss, expected)
for grad, expected_grad in zip(torch.autograd.grad(loss, inputs), torch.autograd.grad(expected, inputs)):
    assert torch.allclose(grad, expected_grad, atol=1e-6)
print("ok")
"""
    assert run_interpreted(script).strip() == "ok"


def test_reference_serves_where_the_kernel_does_not_run():
    import cross_entropy_kernel as ck
    assert not ck.kernel_runs_on("cpu")
    logits = torch.randn(6, 50) * 3
    targets = torch.randint(0, 50, (6,))
    expected_grad = torch.softmax(logits, 1) - F.one_hot(targets, 50)
    expected_loss = F.cross_entropy(logits, targets, reduction="sum")
    loss = ck.cross_entropy_and_grad_(logits, targets, block_rows=4)  # two blocks, the last of two rows
    assert torch.allclose(loss, expected_loss) and torch.allclose(logits, expected_grad, atol=1e-6)


@needs_cuda
@needs_triton
def test_kernel_matches_reference_on_gpu():
    exec(CHECK_KERNEL.format(device="cuda", big=(64, 50304)), {})


@needs_cuda
@needs_triton
def test_model_loss_and_gradients_same_with_and_without_kernel_on_gpu(monkeypatch):
    import cross_entropy_kernel as ck
    from train_gpt2 import GPT, GPTConfig
    calls = []
    kernel = ck.kernel
    monkeypatch.setattr(ck, "kernel", lambda *args: calls.append(1) or kernel(*args))
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=128, n_layer=2, n_head=4, n_embd=128)).cuda()
    idx, targets = (torch.randint(0, 50257, (4, 128), device="cuda") for _ in range(2))
    results = []
    for loss_kernel in (False, True):
        model.lm_head.chunked_loss.use_kernel = loss_kernel
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", torch.bfloat16):
            _, loss = model(idx, targets, return_logits=False)
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
        assert len(calls) == (1 if loss_kernel else 0)  # 512 rows: one chunk, through the kernel only when asked
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert abs(loss_a - loss_b) < 1e-3
    for a, b in zip(grads_a, grads_b):
        assert ((a - b).norm() / a.norm().clamp(min=1e-12)) < 2e-2


@pytest.mark.parametrize("workspace", [None, {}], ids=["fresh buffers", "workspace"])
def test_chunked_loss_of_a_soft_capped_head_with_a_bias_matches_the_plain_loss(workspace):
    from cross_entropy_kernel import linear_cross_entropy
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(50, 8, generator=generator, requires_grad=True)
    weight = torch.randn(100, 8, generator=generator, requires_grad=True)
    bias = torch.randn(100, generator=generator, requires_grad=True)
    targets = torch.randint(0, 100, (50,), generator=generator)
    for cap in (0.0, 3.0):
        logits = F.linear(x, weight, bias)
        expected = F.cross_entropy(3.0 * torch.tanh(logits / 3.0) if cap else logits, targets)
        loss = linear_cross_entropy(x, weight, targets, 13, workspace=workspace, bias=bias, softcap=cap)
        torch.testing.assert_close(loss, expected)
        for grad, expected_grad in zip(torch.autograd.grad(loss, (x, weight, bias)),
                                       torch.autograd.grad(expected, (x, weight, bias))):
            torch.testing.assert_close(grad, expected_grad)
    with torch.autocast("cpu", torch.bfloat16):  # the cap in float32, over the bfloat16 logits
        eager = linear_cross_entropy(x, weight, targets, 13, workspace=workspace, bias=bias, softcap=3.0)
        compiled = torch.compile(linear_cross_entropy)(x, weight, targets, 13, bias=bias, softcap=3.0)
        plain = F.cross_entropy(3.0 * torch.tanh(F.linear(x, weight, bias).float() / 3.0), targets)
    torch.testing.assert_close(eager, plain, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(compiled, plain, rtol=1e-2, atol=1e-2)
    for grad, plain_grad in zip(torch.autograd.grad(eager, (x, weight, bias)),
                                torch.autograd.grad(plain, (x, weight, bias))):
        torch.testing.assert_close(grad, plain_grad, rtol=3e-2, atol=3e-3)
