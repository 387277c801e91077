"""
The training loss of GPT-2's output layer: the logits and their cross-entropy, chunk by chunk, with the
gradient computed in the same pass, and the inner step of it as a Triton kernel beside its plain-torch reference.

    loss = output_layer_loss(x, weight, targets)        # F.cross_entropy(x @ weight.T, targets), chunked
    loss = output_layer_loss(x, weight, targets, bias=bias, softcap=15)  # of 15 tanh((x @ weight.T + bias) / 15)
    loss_sum = cross_entropy_and_grad_(logits, targets)  # logits (N, V) become softmax - one_hot, in place

The chunked loss (LinearCrossEntropy) calls cross_entropy_and_grad_ on each (chunk, vocab) slice of the
logits, after the output layer's bias and soft-cap where it has them (the model's head: train_gpt2.OutputHead),
whose gradients it applies in the same pass. Two versions of cross_entropy_and_grad_ compute the same thing:

- `reference`: plain torch (log_softmax, gather, exp, scatter), for every device. On a GPU it makes about eight
  passes over the chunk: bf16 logits read for the max and again for the sum, float32 log-probabilities written
  and read back, the gradient written in float32, then cast back over the bf16 logits.
- `triton`: one Triton program per row reads the row once for its running max and sum of exponentials, then
  reads it again (a row of GPT-2's vocabulary is 100 KB, so some of the second read may come from L2) to write
  the gradient over it in the logits' dtype: two reads and a write instead of about eight passes. For GPT-2 124M
  on an H100 that made the step 3% faster at batch 32 and 64, the same at batch 8 (BENCHMARKS.md).

The dispatcher uses the kernel on CUDA tensors when Triton is installed, the reference everywhere else.
tests/test_cross_entropy_kernel.py checks the two against each other, on the CPU through Triton's interpreter
(TRITON_INTERPRET=1, set before this file is imported), and on a GPU where there is one. Importing this file
defines, and imports Triton where it can run; it launches nothing.
"""

import contextlib
import math
import os

import torch

triton = None
# Triton only where its kernel can run (a GPU build of torch, or Triton's CPU interpreter): elsewhere its import
# would only slow down every script's start
if torch.version.cuda or torch.version.hip or os.environ.get("TRITON_INTERPRET") == "1":
    try:
        import triton
        import triton.language as tl
    except ImportError:  # a GPU build without Triton: the reference serves
        triton = None


# -----------------------------------------------------------------------------
# The plain-torch reference


def reference(logits, targets, grad_scale=1.0, needs_grad=True, block_rows=None):
    """Sum over rows of -log softmax(logits)[row, target], as a float32 scalar. With needs_grad the logits
    are overwritten by the gradient of that sum, (softmax - one_hot) * grad_scale, in their own dtype.
    block_rows: take the float32 softmax this many rows at a time (the CPU keeps 8 rows in cache); the whole
    (N, V) at once by default."""
    n_rows = logits.size(0)
    block_rows = block_rows or max(n_rows, 1)
    loss = torch.zeros((), dtype=torch.float32, device=logits.device)
    minus_one = torch.full((min(block_rows, n_rows), 1), -1.0, device=logits.device)
    for start in range(0, n_rows, block_rows):
        block = logits[start:start + block_rows]
        target = targets[start:start + block.size(0)].unsqueeze(1)
        log_probs = torch.log_softmax(block.float(), dim=1)
        loss -= log_probs.gather(1, target).sum()
        if needs_grad:
            grad = log_probs.exp_()  # the softmax, in place
            grad.scatter_add_(1, target, minus_one[:block.size(0)])
            if grad_scale != 1.0:
                grad.mul_(grad_scale)
            block.copy_(grad)  # the logits are no longer needed: their gradient takes their place
    return loss


# -----------------------------------------------------------------------------
# The Triton kernel


if triton is not None:
    @triton.jit
    def _cross_entropy_rows(logits_ptr, targets_ptr, losses_ptr, row_stride, grad_scale,
                            N_COLS: tl.constexpr, NEEDS_GRAD: tl.constexpr, BLOCK: tl.constexpr):
        # N_COLS (the vocabulary) is a compile-time constant: one compilation per model, and static loop bounds
        row = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + row * row_stride
        target = tl.load(targets_ptr + row)
        # pass 1: the running max and the sum of exp(logit - max), rescaled whenever the max grows
        running_max = -float("inf")
        sum_exp = 0.0
        for start in range(0, N_COLS, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(row_ptr + cols, mask=cols < N_COLS, other=-float("inf")).to(tl.float32)
            new_max = tl.maximum(running_max, tl.max(x, axis=0))
            sum_exp = sum_exp * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
            running_max = new_max
        log_sum_exp = running_max + tl.log(sum_exp)
        target_logit = tl.load(row_ptr + target).to(tl.float32)
        tl.store(losses_ptr + row, log_sum_exp - target_logit)
        # pass 2: the gradient, softmax minus one-hot, over the logits (read before they are overwritten)
        if NEEDS_GRAD:
            for start in range(0, N_COLS, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                in_row = cols < N_COLS
                x = tl.load(row_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
                grad = tl.exp(x - log_sum_exp) - tl.where(cols == target, 1.0, 0.0)
                tl.store(row_ptr + cols, (grad * grad_scale).to(logits_ptr.dtype.element_ty), mask=in_row)


def kernel(logits, targets, grad_scale=1.0, needs_grad=True):
    """The Triton version of `reference` (its arguments but block_rows, its result): one program per row. The
    rows must be contiguous, and every target in [0, vocab): the kernel does not check (the reference does)."""
    if triton is None:
        raise RuntimeError("the cross-entropy kernel needs Triton: pip install triton")
    if logits.stride(1) != 1:
        raise ValueError("the cross-entropy kernel needs rows of contiguous logits")
    n_rows, n_cols = logits.shape
    losses = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    if n_rows:
        # Triton launches on the current device, which need not be the tensors' (--device cuda:1)
        with torch.cuda.device(logits.device) if logits.is_cuda else contextlib.nullcontext():
            # 4,096 columns a trip: 8 warps each load 16 bf16 logits (two 16-byte loads) per thread
            _cross_entropy_rows[(n_rows,)](logits, targets.contiguous(), losses, logits.stride(0),
                                           float(grad_scale), N_COLS=n_cols, NEEDS_GRAD=needs_grad, BLOCK=4096,
                                           num_warps=8)
    return losses.sum()


# -----------------------------------------------------------------------------
# The dispatcher


def triton_installed():
    return triton is not None


def kernel_runs_on(device):
    """Whether the Triton kernel runs on tensors of this device: CUDA GPUs that Triton compiles for (Volta,
    compute capability 7.0, and later), with Triton installed."""
    device = torch.device(device)
    return triton is not None and device.type == "cuda" and torch.cuda.get_device_capability(device) >= (7, 0)


def cross_entropy_and_grad_(logits, targets, grad_scale=1.0, needs_grad=True, use_kernel=True, block_rows=None):
    """Sum of the rows' cross-entropy (a float32 scalar), the logits overwritten by its gradient times
    grad_scale when needs_grad. The Triton kernel where it runs and use_kernel is set, else the reference."""
    if use_kernel and logits.stride(1) == 1 and kernel_runs_on(logits.device):
        return kernel(logits, targets, grad_scale, needs_grad)
    return reference(logits, targets, grad_scale, needs_grad, block_rows)


# -----------------------------------------------------------------------------
# The chunked loss: the output layer's matmul and the cross-entropy, a chunk of rows at a time


class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of softmax(x @ weight.T + bias) against targets, computed over chunks of rows so
    that only a (chunk, vocab) slice of the logits ever exists. The gradients are computed in the same pass
    (softmax minus one-hot is the gradient of the summed loss with respect to the logits), so the backward
    pass only scales them: the same matmuls as the plain loss, with a fraction of its memory and of its
    passes over (rows, vocab) arrays. The 1/rows of the mean is applied to the small results, never to a
    (rows, vocab) array. bias may be None; cap > 0 soft-caps the logits first, cap * tanh(logits / cap) in
    float32 (capped_cross_entropy_and_grad_).

    With a workspace (a dict, kept by the caller between calls) the logits are written into a buffer kept
    there, and their softmax is taken a few rows at a time, in the cache, into that same buffer. That is for
    the CPU, where every fresh tensor of this size is new memory from the operating system, paid for with a
    page fault on each 4 KiB touched: for GPT-2's vocabulary, nearly as long again as the matmul that fills
    it (BENCHMARKS.md). A GPU's caching allocator already reuses its memory; there each chunk's softmax and
    gradient go through the Triton kernel above (use_kernel), two passes over the chunk's
    logits where plain torch makes about eight."""

    @staticmethod
    def forward(ctx, x, weight, bias, targets, chunk_size, needs_grad, workspace, use_kernel, cap):
        n_rows, vocab_size = x.size(0), weight.size(0)
        # under autocast the matmuls run in the autocast dtype, as nn.Linear's would
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        x_c, w_c = x.to(dtype), weight.to(dtype)
        b_c = None if bias is None else bias.to(dtype)
        # float16 has too little range for the logit gradients (probabilities ~1/vocab): carry them scaled up
        grad_scale = 1024.0 if dtype == torch.float16 else 1.0
        grad_x = torch.empty_like(x) if needs_grad else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if needs_grad else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if needs_grad and bias is not None else None
        loss = torch.zeros((), dtype=torch.float32, device=x.device)
        # the chunk's softmax in 8-row blocks that fit in L2 on the CPU
        block_rows = 8 if workspace is not None else None
        for start in range(0, n_rows, chunk_size):
            end = min(start + chunk_size, n_rows)
            rows = slice(start, end)
            if workspace is None:
                logits = x_c[rows] @ w_c.T  # (chunk, V)
            else:
                logits = torch.mm(x_c[rows], w_c.T, out=reusable_buffer(workspace, (end - start, vocab_size), dtype))
            if b_c is not None:
                logits += b_c
            # the chunk's loss, its logits overwritten by their gradient
            if cap:
                loss += capped_cross_entropy_and_grad_(logits, targets[rows], cap, grad_scale, needs_grad,
                                                       use_kernel, block_rows, workspace)
            else:
                loss += cross_entropy_and_grad_(logits, targets[rows], grad_scale, needs_grad, use_kernel,
                                                block_rows=block_rows)
            if needs_grad:
                grad_x[rows] = logits @ w_c
                if dtype == torch.float32:
                    grad_w.addmm_(logits.T, x_c[rows])
                else:  # accumulate the chunks' bf16/fp16 products in float32
                    grad_w += (logits.T @ x_c[rows]).float()
                if grad_b is not None:
                    grad_b += logits.sum(0, dtype=torch.float32)
        if needs_grad:
            grad_b = grad_x.new_zeros(0) if grad_b is None else grad_b.to(bias.dtype)  # saved tensors: not None
            ctx.save_for_backward(grad_x, grad_w.to(weight.dtype), grad_b)
            ctx.has_bias = bias is not None
            ctx.divisor = n_rows * grad_scale  # the mean's 1/rows, and the float16 scale-up undone
        return loss / n_rows

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w, grad_b = ctx.saved_tensors
        scale = grad_loss / ctx.divisor
        # scaled in place: they were made for this one use, and a copy of grad_w is another (vocab, C) array
        grad_b = grad_b.mul_(scale) if ctx.has_bias else None
        return grad_x.mul_(scale), grad_w.mul_(scale), grad_b, None, None, None, None, None, None


def capped_cross_entropy_and_grad_(logits, targets, cap, grad_scale, needs_grad, use_kernel, block_rows,
                                   workspace):
    """cross_entropy_and_grad_ of the soft-capped logits, cap * tanh(logits / cap), taken in float32 (as
    train_gpt2.softcap takes them), in a second (chunk, V) buffer; the logits overwritten by the gradient
    with respect to them: the capped logits' gradient times the cap's derivative, 1 - tanh^2."""
    shape = logits.shape
    capped = (torch.empty(shape, dtype=torch.float32, device=logits.device) if workspace is None
              else reusable_buffer(workspace, shape, torch.float32, name="capped"))
    capped.copy_(logits).div_(cap).tanh_()
    if needs_grad:  # the derivative, rounded once to the logits' dtype, where the logits were
        torch.addcmul(capped.new_ones(()), capped, capped, value=-1.0, out=logits)
    loss = cross_entropy_and_grad_(capped.mul_(cap), targets, grad_scale, needs_grad, use_kernel,
                                   block_rows=block_rows)
    if needs_grad:
        logits.mul_(capped)
    return loss


def reusable_buffer(workspace, shape, dtype, name="logits"):
    """An uninitialized CPU tensor of this shape, kept in workspace under name and reused while it is large
    enough."""
    size = math.prod(shape)
    buffer = workspace.get(name)
    if buffer is None or buffer.numel() < size or buffer.dtype != dtype:
        buffer = workspace[name] = torch.empty(size, dtype=dtype)
    return buffer[:size].view(shape)


def linear_cross_entropy(x, weight, targets, chunk_size=4096, workspace=None, use_kernel=True, bias=None,
                         softcap=0.0):
    """F.cross_entropy(x @ weight.T + bias, targets) without the full logits; x (N, C), weight (V, C), targets
    (N,), bias (V,) or None; softcap > 0: of softcap * tanh(logits / softcap). workspace: a dict to keep the
    logits buffers in between calls (see LinearCrossEntropy). use_kernel: the Triton kernel above for each
    chunk's softmax where it runs (CUDA), else plain torch."""
    # grad mode is off inside forward(), so it is read here: an evaluation must not pay for gradients
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    return LinearCrossEntropy.apply(x, weight, bias, targets, chunk_size, needs_grad, workspace, use_kernel,
                                    softcap)


def output_layer_loss(x, weight, targets, workspace=None, use_kernel=True, bias=None, softcap=0.0):
    """The model's training loss: linear_cross_entropy, with the kernel where it runs (CUDA with Triton) and the
    workspace on the CPU. Inside a compiled model it runs eager, the rest of the model compiled: in place into a
    kept buffer (the CPU), which a compiled graph would turn into copies, or a Triton kernel (a GPU). No device
    query here, inside the compiled region: the loss itself checks the GPU and falls back."""
    on_cpu = x.device.type == "cpu"
    use_kernel = use_kernel and x.is_cuda and triton_installed()
    loss_fn = linear_cross_entropy
    if (on_cpu or use_kernel) and torch.compiler.is_compiling():
        loss_fn = torch.compiler.disable(loss_fn)  # wrapped here, not at import: that imports the compiler
    return loss_fn(x, weight, targets, workspace=workspace if on_cpu else None, use_kernel=use_kernel, bias=bias,
                   softcap=softcap)


class OutputLayerLoss:
    """output_layer_loss with what it keeps from call to call: the CPU logits buffer (workspace), and
    whether the kernel is used where it runs (use_kernel: train_gpt2.py's --loss_kernel)."""

    def __init__(self, use_kernel=True):
        self.use_kernel, self.workspace = use_kernel, {}

    def __call__(self, x, weight, targets, bias=None, softcap=0.0):
        return output_layer_loss(x, weight, targets, self.workspace, self.use_kernel, bias, softcap)
