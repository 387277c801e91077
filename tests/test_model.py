"""The GPT-2 model: shapes, weight tying, initialization, sampling, and that it learns."""

import math

import pytest
import torch

from fineweb import load_tokenizer
from train_gpt2 import GPT, GPTConfig, ShardLoader, TrainConfig, load_token_sources, make_optimizers
from conftest import INPUT_TXT


def tiny_config(**overrides):
    return GPTConfig(**{"block_size": 32, "vocab_size": 50304, "n_layer": 2, "n_head": 2, "n_embd": 64, **overrides})


def test_forward_returns_logits_over_padded_vocab_and_a_loss_near_uniform():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    idx, targets = torch.randint(0, 50257, (2, 3, 16))
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 16, 50304)
    assert loss.shape == ()
    assert abs(loss.item() - math.log(50304)) < 0.1  # a fresh model predicts nearly uniformly


def test_forward_without_targets_returns_no_loss():
    logits, loss = GPT(tiny_config())(torch.zeros(1, 5, dtype=torch.long))
    assert logits.shape == (1, 5, 50304) and loss is None


def test_lm_head_is_tied_to_the_token_embedding():
    model = GPT(tiny_config())
    assert model.lm_head.weight is model.transformer.wte.weight
    n_unique = sum(p.numel() for p in model.parameters())
    assert n_unique == model.num_params(non_embedding=False)
    _, loss = model(torch.randint(0, 100, (2, 8)), torch.randint(0, 100, (2, 8)))
    loss.backward()
    assert model.transformer.wte.weight.grad is not None


def test_gpt2_124m_has_the_papers_parameter_count():
    with torch.device("meta"):
        model = GPT(GPTConfig())
    assert model.num_params(non_embedding=False) == 124_475_904  # 124M with the vocabulary padded to 50,304


def test_residual_projections_are_initialized_with_scaled_std():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, n_layer=8, n_head=4, n_embd=256))
    expected = 0.02 / math.sqrt(2 * 8)
    assert model.transformer.h[0].attn.c_proj.weight.std().item() == pytest.approx(expected, rel=0.05)
    assert model.transformer.h[0].mlp.c_proj.weight.std().item() == pytest.approx(expected, rel=0.05)
    assert model.transformer.h[0].mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.transformer.wpe.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.transformer.h[0].attn.c_attn.bias.abs().max().item() == 0


def test_attention_is_causal():
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    idx = torch.randint(0, 50257, (1, 10))
    changed = idx.clone()
    changed[0, 7:] = (changed[0, 7:] + 1) % 50257
    logits_a, _ = model(idx)
    logits_b, _ = model(changed)
    torch.testing.assert_close(logits_a[:, :7], logits_b[:, :7])
    assert not torch.allclose(logits_a[:, 7:], logits_b[:, 7:])


def test_sequence_longer_than_the_block_is_refused():
    with pytest.raises(ValueError, match="longer than the block size"):
        GPT(tiny_config(block_size=8))(torch.zeros(1, 9, dtype=torch.long))


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    idx = torch.randint(0, 50257, (2, 16))
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = checkpointing
        model(idx, idx)[1].backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(plain, recomputed)


def test_generate_never_samples_the_padded_ids():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.fill_(1.0)  # every position's final hidden state is all ones
        model.lm_head.weight[50257:] = 1.0  # so the padded ids get by far the largest logits
    out = model.generate(torch.zeros(4, 1, dtype=torch.long), 20, vocab_limit=50257,
                         generator=torch.Generator().manual_seed(0))
    assert out.shape == (4, 21)
    assert out.max().item() < 50257
    unrestricted = model.generate(torch.zeros(4, 1, dtype=torch.long), 5, generator=torch.Generator().manual_seed(0))
    assert unrestricted[:, 1:].min().item() >= 50257  # the test model really does prefer the padding


def test_generate_is_reproducible_under_a_seed_and_decodes():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    runs = [model.generate(torch.zeros(2, 1, dtype=torch.long), 10, top_k=50, vocab_limit=50257,
                           generator=torch.Generator().manual_seed(42)) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    assert isinstance(load_tokenizer().decode(runs[0][0].tolist()), str)


def test_a_few_steps_on_input_txt_lower_the_loss():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    optimizer = make_optimizers(model, TrainConfig(learning_rate=3e-3), "cpu")["adamw"]
    gpt2 = load_tokenizer()
    loader = ShardLoader(load_token_sources(INPUT_TXT, "train", gpt2), batch_size=8, block_size=32, micro_steps=1,
                         n_vocab=gpt2.n_vocab)
    losses = []
    for _ in range(30):
        x, y = loader.next_batch()
        _, loss = model(x[0], y[0])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < losses[0] - 2.0


def test_weight_decay_applies_to_two_dimensional_weights_only():
    model = GPT(tiny_config())
    tables, matrices, rest = make_optimizers(model, TrainConfig(weight_decay=0.1), "cpu")["adamw"].param_groups
    assert tables["weight_decay"] == matrices["weight_decay"] == 0.1 and rest["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in tables["params"] + matrices["params"])
    assert all(p.dim() < 2 for p in rest["params"])
    assert sum(len(g["params"]) for g in (tables, matrices, rest)) == len(list(model.parameters()))


def test_param_groups_name_each_parameter_by_its_role():
    model = GPT(tiny_config())
    groups = model.param_groups()
    name_of = {id(p): name for name, p in model.named_parameters()}
    names = {role: [name_of[id(p)] for p in params] for role, params in groups.items()}
    assert names["tables"] == ["transformer.wte.weight", "transformer.wpe.weight"]  # wte is also lm_head
    assert names["matrices"] and all(n.startswith("transformer.h.") and n.endswith(".weight")
                                     for n in names["matrices"])
    assert all(n.endswith((".bias", "ln_1.weight", "ln_2.weight", "ln_f.weight")) for n in names["gains_and_biases"])
    assert sum(map(len, groups.values())) == len(list(model.parameters()))


def test_the_model_counts_its_own_parameters_and_flops_whatever_its_positions():
    model = GPT(tiny_config())
    c = model.config
    assert model.num_params(non_embedding=False) == sum(p.numel() for p in model.parameters())
    assert model.num_params() == model.num_params(non_embedding=False) - c.block_size * c.n_embd
    assert model.flops_per_token() == 6 * model.num_params() + 12 * c.n_layer * c.n_embd * c.block_size
    del model.transformer.wpe  # a model without a position table (rotary, say) counts all it has
    assert model.num_params() == sum(p.numel() for p in model.parameters())


def test_chunked_loss_equals_the_plain_loss_and_its_gradients():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    idx, targets = torch.randint(0, 50257, (2, 3, 16))
    grads = []
    for return_logits in (True, False):
        model.zero_grad()
        logits, loss = model(idx, targets, return_logits=return_logits)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
        assert (logits is None) == (not return_logits)
    (plain_loss, plain_grads), (chunked_loss, chunked_grads) = grads
    torch.testing.assert_close(chunked_loss, plain_loss)
    for plain, chunked in zip(plain_grads, chunked_grads):
        torch.testing.assert_close(chunked, plain)


def test_chunked_loss_matches_over_several_chunks_and_without_grad():
    from cross_entropy_kernel import linear_cross_entropy
    torch.manual_seed(0)
    x, weight, targets = torch.randn(50, 8), torch.randn(100, 8), torch.randint(0, 100, (50,))
    expected = torch.nn.functional.cross_entropy(x @ weight.T, targets)
    torch.testing.assert_close(linear_cross_entropy(x, weight, targets, chunk_size=7), expected)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(x.requires_grad_(), weight, targets, 7), expected)


def loss_problem():
    """x, weight and targets for linear_cross_entropy: 50 rows, so that chunks of 13 and blocks of 8 leave
    remainders, over a vocabulary of 100."""
    torch.manual_seed(0)
    x, weight = torch.randn(50, 8, requires_grad=True), torch.randn(100, 8, requires_grad=True)
    return x, weight, torch.randint(0, 100, (50,))


def assert_same_loss_and_gradients(loss, expected, inputs):
    torch.testing.assert_close(loss, expected)
    expected_grads = torch.autograd.grad(expected, inputs, retain_graph=True)
    for grad, expected_grad in zip(torch.autograd.grad(loss, inputs), expected_grads):
        torch.testing.assert_close(grad, expected_grad)


def test_chunked_loss_in_a_workspace_matches_and_reuses_its_buffer():
    from cross_entropy_kernel import linear_cross_entropy
    x, weight, targets = loss_problem()
    expected = torch.nn.functional.cross_entropy(x @ weight.T, targets)
    workspace = {}
    for call in range(2):
        loss = linear_cross_entropy(x, weight, targets, chunk_size=13, workspace=workspace)
        assert_same_loss_and_gradients(loss, expected, (x, weight))
        if call == 0:
            buffer = workspace["logits"]
    assert workspace["logits"] is buffer and buffer.numel() == 13 * 100


def test_chunked_loss_in_a_workspace_under_bfloat16_autocast_matches_without():
    from cross_entropy_kernel import linear_cross_entropy
    x, weight, targets = loss_problem()
    with torch.autocast("cpu", torch.bfloat16):
        without = linear_cross_entropy(x, weight, targets, chunk_size=13)
        within = linear_cross_entropy(x, weight, targets, chunk_size=13, workspace={})
    assert_same_loss_and_gradients(within, without, (x, weight))


def test_chunked_loss_without_a_workspace_compiles_to_the_same_loss_and_gradients():
    from cross_entropy_kernel import linear_cross_entropy
    x, weight, targets = loss_problem()
    expected = torch.nn.functional.cross_entropy(x @ weight.T, targets)
    # no workspace: the path a GPU takes, which runs inside the compiled model's graph
    assert_same_loss_and_gradients(torch.compile(linear_cross_entropy)(x, weight, targets, 13), expected, (x, weight))
    with torch.autocast("cpu", torch.bfloat16):  # and as a GPU's bfloat16 autocast runs it
        compiled = torch.compile(linear_cross_entropy)(x, weight, targets, 13)
        eager = linear_cross_entropy(x, weight, targets, 13)
    for a, b in zip(torch.autograd.grad(compiled, (x, weight)), torch.autograd.grad(eager, (x, weight))):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(compiled, eager, rtol=1e-2, atol=1e-3)


def test_compiled_model_on_the_cpu_runs_its_loss_eagerly_in_the_workspace_and_matches_eager():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    idx, targets = torch.randint(0, 50257, (2, 2, 16))
    results = []
    for step_model in (model, torch.compile(model)):
        model.zero_grad()
        model.lm_head.chunked_loss.workspace.clear()
        _, loss = step_model(idx, targets, return_logits=False)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
        assert model.lm_head.chunked_loss.workspace["logits"].shape == (2 * 16 * 50304,)
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
    torch.testing.assert_close(compiled_loss, eager_loss)
    for eager, compiled in zip(eager_grads, compiled_grads):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-6)


# each of the speedruns' options, as its flags set it
OPTIONS = {"rotary": dict(positions="rotary"), "rmsnorm": dict(norm="rmsnorm"), "no biases": dict(bias=False),
           "relu2": dict(mlp="relu2"), "swiglu": dict(mlp="swiglu"), "qk_norm": dict(qk_norm=True, attn_scale=0.3),
           "untied": dict(tie_embeddings=False), "softcap": dict(logit_softcap=2.0),
           "zero-initialized projections": dict(zero_init_projections=True)}


@pytest.mark.parametrize("option", OPTIONS)
def test_each_option_trains_the_loss_of_the_logits_it_gives(option):
    torch.manual_seed(0)
    model = GPT(tiny_config(**OPTIONS[option]))
    with torch.no_grad():  # an untied head and zeroed projections start at zero: give them something to pass on
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05) if p.dim() == 2 else None
    idx, targets = torch.randint(0, 50257, (2, 2, 16))
    logits, _ = model(idx)
    expected = torch.nn.functional.cross_entropy(logits.float().view(-1, 50304), targets.view(-1))
    _, chunked = model(idx, targets, return_logits=False)
    assert_same_loss_and_gradients(chunked, expected, list(model.parameters()))
    assert model.num_params(non_embedding=False) == sum(p.numel() for p in model.parameters())


def test_each_option_is_where_its_module_reads_it():
    model = GPT(tiny_config(positions="rotary", norm="rmsnorm", bias=False, mlp="swiglu", tie_embeddings=False))
    block = model.transformer.h[0]
    assert "wpe" not in model.transformer and isinstance(block.ln_1, torch.nn.RMSNorm)
    assert not any(name.endswith("bias") for name, _ in model.named_parameters())
    assert block.mlp.c_gate.weight.shape == block.mlp.c_fc.weight.shape == (8 * 64 // 3, 64)
    assert model.lm_head.weight is not model.transformer.wte.weight and model.lm_head.weight.abs().max() == 0
    zeroed = GPT(tiny_config(zero_init_projections=True)).transformer.h[1]
    assert zeroed.attn.c_proj.weight.abs().max() == zeroed.mlp.c_proj.weight.abs().max() == 0
    assert zeroed.attn.c_attn.weight.std() > 0.01


def test_the_softcap_holds_the_logits_and_changes_the_training_loss():
    torch.manual_seed(0)
    plain, capped = GPT(tiny_config()), GPT(tiny_config(logit_softcap=2.0))
    with torch.no_grad():
        plain.lm_head.weight.mul_(10)  # logits of several units, which the cap bends
    capped.load_state_dict(plain.state_dict())
    idx, targets = torch.randint(0, 50257, (2, 2, 16))
    assert plain(idx)[0].abs().max() > 4 and capped(idx)[0].abs().max() <= 2
    assert capped(idx, targets, return_logits=False)[1] != plain(idx, targets, return_logits=False)[1]
    x = capped.transformer.ln_f(torch.randn(3, 64))
    torch.testing.assert_close(capped.lm_head(x), 2.0 * torch.tanh(plain.lm_head(x) / 2.0))


def test_an_untied_head_has_a_role_of_its_own_and_every_parameter_one_role():
    model = GPT(tiny_config(tie_embeddings=False, norm="rmsnorm", bias=False))
    groups = model.param_groups()
    assert groups["head"] == [model.lm_head.weight] and "gains_and_biases" not in groups
    assert groups["tables"] == [model.transformer.wte.weight, model.transformer.wpe.weight]
    ids = [id(p) for params in groups.values() for p in params]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())


def test_a_parameter_without_a_role_or_an_optimizer_that_forgets_one_is_refused(monkeypatch):
    import optimizers
    model = GPT(tiny_config())
    model.transformer.h[0].extra = torch.nn.Bilinear(2, 2, 2)  # a researcher's new kind of module
    with pytest.raises(ValueError, match="a .2, 2, 2. parameter of a Bilinear has no role"):
        model.param_groups()
    monkeypatch.setitem(optimizers.OPTIMIZERS, "adamw", lambda groups, config, device_type: {
        "adamw": torch.optim.AdamW(groups["matrices"] + groups["gains_and_biases"])})
    with pytest.raises(ValueError, match="trains transformer.wte.weight 0 times"):
        make_optimizers(GPT(tiny_config()), TrainConfig(), "cpu")
