"""
The optimizers: one function each, from the model's parameter groups to the torch optimizers that train
them, its flags beside it; and the state an optimizer builds for a model, stepped on the meta device.

    optimizers = make_optimizers(model, config, device_type)  # {name: torch optimizer}, for --optimizer
    optimizers = stepped_on_meta(meta_model, config)           # the same, stepped once without memory

To add an optimizer, add a function `name(groups, config, device_type)` to OPTIMIZERS that returns
{name: torch optimizer}; groups is the model's GPT.param_groups(), {role: [parameters]}, and each param
group carries its own base_lr, which the schedule scales. Its flags, if it has any, are a dataclass beside
it in OPTIMIZER_FLAGS, which train_gpt2.TrainConfig includes; a flag of an optimizer that a run does not
use is warned about. The checkpoint, its resume (checked against the state the optimizer builds for the
model, stepped_on_meta), the memory checks and bench.py take a new optimizer as it is. Nothing here
imports the model.
"""

import dataclasses
from dataclasses import dataclass

import torch

from cli import UserError, flag
from device import cpu_has_bf16

# -----------------------------------------------------------------------------
# AdamW, for every role


def fused_adamw(groups, device_type):
    """torch's AdamW, fused where this device and torch have it."""
    try:
        return torch.optim.AdamW(groups, betas=(0.9, 0.95), eps=1e-8,
                                 fused=device_type in ("cuda", "cpu"))
    except (RuntimeError, TypeError):  # this device or torch has no fused AdamW
        return torch.optim.AdamW(groups, betas=(0.9, 0.95), eps=1e-8)


def adamw_groups(groups, config, roles):
    """AdamW's param groups for the roles given (those the model has): weight decay on the 2-D ones
    (tables, head and matrices) alone, every group at --learning_rate."""
    decays = {"tables": config.weight_decay, "head": config.weight_decay,
              "matrices": config.weight_decay, "gains_and_biases": 0.0}
    return [{"params": groups[role], "weight_decay": decays[role], "base_lr": config.learning_rate}
            for role in roles if role in groups]


def adamw(groups, config, device_type):
    """AdamW for every parameter."""
    roles = ("tables", "head", "matrices", "gains_and_biases")
    return {"adamw": fused_adamw(adamw_groups(groups, config, roles), device_type)}


def check_runs_here(config, name, since, under_fsdp):
    """A torch optimizer's refusals, where the run's torch lacks it (torch.optim.{name}, from torch
    `since` on) and under --fsdp (under_fsdp: why not)."""
    flag_value = name.lower()
    if not hasattr(torch.optim, name):
        raise UserError(f"--optimizer {flag_value} needs torch {since} or later (torch.optim.{name}); "
                        f"this is torch {torch.__version__}: upgrade torch or pass --optimizer adamw")
    if config.fsdp:
        raise UserError(f"--optimizer {flag_value} {under_fsdp}: train with DDP (--fsdp False) or "
                        "--optimizer adamw")


# -----------------------------------------------------------------------------
# Muon, for the blocks' matrices


@dataclass
class MuonFlags:
    """--optimizer muon's flags."""
    muon_lr: float = flag(0.02, "--optimizer muon: the matrices' peak learning rate, scaled by the "
                                "schedule as --learning_rate is")
    muon_momentum: float = flag(0.95, "--optimizer muon: the matrices' momentum (Nesterov)")
    muon_lr_scaling: str = flag("original", "--optimizer muon: how each matrix's rate follows its "
                                            "shape: 'original' (x sqrt(max(1, rows/cols))) or "
                                            "'match_rms_adamw' (x 0.2 sqrt(max(rows, cols)): an "
                                            "update of AdamW's size, so rates near AdamW's)")

    @staticmethod
    def check(config):
        """Where Muon cannot run, and its flags' ranges (config: the run's TrainConfig)."""
        check_runs_here(config, "Muon", "2.9", "needs whole matrices, which --fsdp True shards over "
                                               "the processes")
        if config.muon_lr <= 0 or not 0 <= config.muon_momentum < 1:
            raise UserError(f"--muon_lr must be positive and --muon_momentum from 0 to below 1, "
                            f"got {config.muon_lr} and {config.muon_momentum}")
        if config.muon_lr_scaling not in ("original", "match_rms_adamw"):
            raise UserError(f"--muon_lr_scaling {config.muon_lr_scaling!r} is not one of original, "
                            "match_rms_adamw")


def muon(groups, config, device_type):
    """Muon (torch.optim.Muon, torch 2.9 on) for the blocks' matrices: momentum, then each update
    orthogonalized by Newton-Schulz iterations (one buffer per matrix); AdamW for the tables, the
    untied head, the gains and biases, as the speedruns train them. The matrices take
    --weight_decay too (decoupled, as AdamW's)."""
    matrices = {"params": groups["matrices"], "weight_decay": config.weight_decay,
                "base_lr": config.muon_lr}
    float32_newton_schulz_where_bf16_is_emulated()
    return {"muon": torch.optim.Muon([matrices], momentum=config.muon_momentum,
                                     adjust_lr_fn=config.muon_lr_scaling),
            "adamw": fused_adamw(adamw_groups(groups, config, ("tables", "head", "gains_and_biases")),
                                 device_type)}


def float32_newton_schulz_where_bf16_is_emulated():
    """torch.optim.Muon orthogonalizes each update by Newton-Schulz iterations in bfloat16, which a CPU
    without bfloat16 instructions emulates, slowly: there they took most of Muon's step (BENCHMARKS.md). On
    such a CPU, and only there, they run in float32: torch's function is replaced by one that hands every
    other call (GPUs, CPUs with the instructions) to it unchanged. A torch without it is left alone."""
    try:
        from torch.optim import _muon
    except ImportError:  # before torch 2.9: no Muon
        return
    torch_newton_schulz = getattr(_muon, "_zeropower_via_newtonschulz", None)
    if torch_newton_schulz is None or hasattr(torch_newton_schulz, "torch_newton_schulz"):
        return

    def newton_schulz(grad, ns_coefficients, ns_steps, eps):
        if grad.device.type != "cpu" or cpu_has_bf16():
            return torch_newton_schulz(grad, ns_coefficients, ns_steps, eps)
        return newton_schulz_float32(grad, ns_coefficients, ns_steps, eps)
    newton_schulz.torch_newton_schulz = torch_newton_schulz
    _muon._zeropower_via_newtonschulz = newton_schulz


def newton_schulz_float32(grad, ns_coefficients, ns_steps, eps):
    """torch.optim.Muon's quintic Newton-Schulz iterations (torch/optim/_muon.py), in float32."""
    a, b, c = ns_coefficients
    x = grad.float()
    if grad.size(0) > grad.size(1):
        x = x.T
    x = x / x.norm().clamp(min=eps)  # its spectral norm at most 1
    for _ in range(ns_steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if grad.size(0) > grad.size(1) else x


# -----------------------------------------------------------------------------
# Adafactor, for every role: a second optimizer whose state has other shapes than AdamW's


@dataclass
class AdafactorFlags:
    """--optimizer adafactor's flags."""
    adafactor_lr: float = flag(0.01, "--optimizer adafactor: the peak relative step (torch's lr: "
                                     "each update is at most this times its parameter's RMS)")
    adafactor_beta2_decay: float = flag(-0.8, "--optimizer adafactor: the second moment's decay, "
                                              "beta2 = 1 - step^decay")

    @staticmethod
    def check(config):
        check_runs_here(config, "Adafactor", "2.5", "cannot step the sharded matrices of --fsdp True "
                                                    "(torch's in-place norms fail on them)")
        if config.adafactor_lr <= 0 or config.adafactor_beta2_decay >= 0:
            raise UserError(f"--adafactor_lr must be positive and --adafactor_beta2_decay negative, "
                            f"got {config.adafactor_lr} and {config.adafactor_beta2_decay}")


def adafactor(groups, config, device_type):
    """torch's Adafactor (torch 2.5 on) for every parameter: no first moment, and a matrix's second
    moment kept as its rows' and columns' means; each update relative to its parameter's RMS (torch's
    reads the values as it steps). --weight_decay on the 2-D roles, decoupled."""
    param_groups = [{"params": params, "base_lr": config.adafactor_lr,
                     "weight_decay": 0.0 if role == "gains_and_biases" else config.weight_decay}
                    for role, params in groups.items()]
    return {"adafactor": torch.optim.Adafactor(param_groups, beta2_decay=config.adafactor_beta2_decay)}


OPTIMIZERS = {"adamw": adamw, "muon": muon, "adafactor": adafactor}  # --optimizer's choices
OPTIMIZER_FLAGS = {"muon": MuonFlags, "adafactor": AdafactorFlags}  # train_gpt2.TrainConfig includes each


# -----------------------------------------------------------------------------
# The run's optimizers: checked, built, and built without memory


def check_optimizer(config):
    """--optimizer one of OPTIMIZERS, and its own flags (their check), else a one-line error."""
    if config.optimizer not in OPTIMIZERS:
        raise UserError(f"--optimizer {config.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
    if config.optimizer in OPTIMIZER_FLAGS:
        OPTIMIZER_FLAGS[config.optimizer].check(config)


def unused_flag_warnings(config, explicit):
    """A line for each flag given (explicit: their names) that belongs to an optimizer other than
    the run's, which would otherwise be ignored without a word."""
    return [f"warning: --{field.name} is a flag of --optimizer {name}, not of this run's "
            f"--optimizer {config.optimizer}: it has no effect"
            for name, flags in OPTIMIZER_FLAGS.items() if name != config.optimizer
            for field in dataclasses.fields(flags) if field.name in explicit]


def make_optimizers(model, config, device_type):
    """{name: torch optimizer} for --optimizer, each group's lr at its base_lr."""
    optimizers = OPTIMIZERS[config.optimizer](model.param_groups(), config, device_type)
    check_trained_once(model, optimizers, config.optimizer)
    for optimizer in optimizers.values():
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"]
    return optimizers


def check_trained_once(model, optimizers, name):
    """Every trainable parameter of the model in exactly one of the optimizers' groups, else a
    ValueError naming the first that is not (a role an optimizer function forgot, say)."""
    counts = {}
    for optimizer in optimizers.values():
        for group in optimizer.param_groups:
            for p in group["params"]:
                counts[id(p)] = counts.get(id(p), 0) + 1
    for param_name, p in model.named_parameters():
        if p.requires_grad and counts.get(id(p), 0) != 1:
            raise ValueError(f"--optimizer {name} trains {param_name} {counts.get(id(p), 0)} times: "
                             "each parameter must be in exactly one group")


class MetaValues(torch.overrides.TorchFunctionMode):
    """A meta tensor has no values: read as a number (.item(), float(), int(), bool()), as some
    optimizers read their parameters' norms while they step (Adafactor), one answers 1 here instead
    of an error, so that any optimizer steps on the meta device and builds its state there."""
    READS = {torch.Tensor.item: 1.0, torch.Tensor.__float__: 1.0, torch.Tensor.__int__: 1,
             torch.Tensor.__bool__: True}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.READS and isinstance(args[0], torch.Tensor) and args[0].is_meta:
            return self.READS[func]
        return func(*args, **(kwargs or {}))


def stepped_on_meta(model, config):
    """The run's optimizers for a model built on the meta device, stepped once on gradients of
    zeros: their state as a real step builds it (which tensors, of which shapes), in no memory."""
    optimizers = make_optimizers(model, config, "meta")
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    with MetaValues():
        for optimizer in optimizers.values():
            optimizer.step()
    return optimizers


def optimizer_state_bytes(optimizer):
    """The bytes of the tensors an optimizer keeps (its moments, once it has stepped)."""
    return sum(value.numel() * value.element_size() for state in optimizer.state.values()
               for value in state.values() if isinstance(value, torch.Tensor))
