"""Token shards and the data loader: the format, the rank/micro-step split, epochs, resume, validation."""

import numpy as np
import pytest
import torch

from fineweb import HEADER_BYTES, MAGIC, open_shard, read_shard_header, sampled_fingerprint, write_shard
from cli import UserError
from evaluation import val_batch_positions
from fineweb import load_token_sources, load_tokenizer
from train_gpt2 import ShardLoader
from conftest import INPUT_TXT

GPT2 = load_tokenizer()


def gpt2_loader(*args, **kwargs):
    """The trainer's loader, of shards of GPT-2's ids."""
    return ShardLoader(*args, n_vocab=GPT2.n_vocab, **kwargs)


def make_shards(directory, sizes, split="train", seed=0):
    rng = np.random.default_rng(seed)
    shards = []
    for i, n in enumerate(sizes):
        tokens = rng.integers(0, 50257, n, dtype=np.uint16)
        write_shard(directory / f"test_{split}_{i:06d}.bin", tokens)
        shards.append(tokens)
    return shards


def test_shard_round_trips_through_a_memmap(tmp_path):
    tokens = np.arange(1000, dtype=np.uint16)
    write_shard(tmp_path / "a.bin", tokens)
    assert (tmp_path / "a.bin").stat().st_size == HEADER_BYTES + 2000
    assert read_shard_header(tmp_path / "a.bin") == (1000, np.dtype("<u2"))
    shard = open_shard(tmp_path / "a.bin")
    assert isinstance(shard, np.memmap)
    assert np.array_equal(shard, tokens)
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def test_header_names_magic_version_and_count(tmp_path):
    write_shard(tmp_path / "a.bin", np.zeros(7, dtype=np.uint16))
    header = np.fromfile(tmp_path / "a.bin", dtype="<i4", count=3)
    assert header.tolist() == [MAGIC, 1, 7]


@pytest.mark.parametrize("damage, message", [
    (lambda b: b"\0" * 4 + b[4:], "not a token shard"),
    (lambda b: b[:-2], "truncated or empty"),
    (lambda b: b[:HEADER_BYTES // 2], "shorter than the"),
    (lambda b: b[:8] + np.array([0], "<i4").tobytes() + b[12:HEADER_BYTES], "truncated or empty"),
])
def test_malformed_shards_are_refused_with_the_file_named(tmp_path, damage, message):
    write_shard(tmp_path / "a.bin", np.ones(10, dtype=np.uint16))
    path = tmp_path / "a.bin"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(UserError, match=message) as error:
        read_shard_header(path)
    assert str(path) in str(error.value)


def global_batches(sources, steps, batch_size, micro_steps, world_size, seed=0, shuffle=True):
    """The global batches as the ranks see them together: (steps, rows, T) inputs."""
    loaders = [gpt2_loader(sources, batch_size, 8, micro_steps, rank, world_size, seed, shuffle)
               for rank in range(world_size)]
    batches = []
    for _ in range(steps):
        parts = [loader.next_batch()[0] for loader in loaders]  # each (micro_steps, B, T)
        rows = [parts[rank][micro] for micro in range(micro_steps) for rank in range(world_size)]
        batches.append(torch.cat(rows))
    return torch.stack(batches)


@pytest.mark.parametrize("shuffle", [True, False], ids=["shuffled", "sequential"])
def test_global_batches_do_not_depend_on_the_rank_and_micro_step_split(tmp_path, shuffle):
    make_shards(tmp_path, [500, 700, 300])  # 45 steps of 4 rows x 8 tokens an epoch: 50 steps cross into the next
    sources = load_token_sources(tmp_path, "train", GPT2)
    one_process = global_batches(sources, 50, batch_size=2, micro_steps=2, world_size=1, shuffle=shuffle)
    two_processes = global_batches(sources, 50, batch_size=2, micro_steps=1, world_size=2, shuffle=shuffle)
    four_ranks = global_batches(sources, 50, batch_size=1, micro_steps=1, world_size=4, shuffle=shuffle)
    two_by_two = global_batches(sources, 50, batch_size=1, micro_steps=2, world_size=2, shuffle=shuffle)
    assert torch.equal(one_process, two_processes)
    assert torch.equal(one_process, four_ranks)
    assert torch.equal(one_process, two_by_two)


def test_each_rank_gets_a_different_part_and_targets_are_shifted_inputs(tmp_path):
    make_shards(tmp_path, [1000])
    sources = load_token_sources(tmp_path, "train", GPT2)
    x0, y0 = gpt2_loader(sources, 2, 8, 1, rank=0, world_size=2, shuffle=False).next_batch()
    x1, _ = gpt2_loader(sources, 2, 8, 1, rank=1, world_size=2, shuffle=False).next_batch()
    assert not torch.equal(x0, x1)
    tokens = torch.from_numpy(sources[0][1][:33].astype(np.int64))
    assert torch.equal(x0[0].flatten(), tokens[:16]) and torch.equal(y0[0].flatten(), tokens[1:17])
    assert torch.equal(x1[0].flatten(), tokens[16:32])


def counting_shards(directory, windows, block_size=8):
    """Shards of (windows * block_size + 1) tokens counting up from shard * 1000: a row's first token names its
    shard and window."""
    for i, n in enumerate(windows):
        write_shard(directory / f"test_train_{i:06d}.bin", np.arange(n * block_size + 1, dtype=np.uint16) + 1000 * i)
    return load_token_sources(directory, "train", GPT2)


def epoch_rows(loader, steps):
    """The rows (as their first input tokens) that `steps` steps read, in order; on counting shards each
    target row is its input row one token on."""
    rows = []
    for _ in range(steps):
        x, y = loader.next_batch()
        assert torch.equal(y, x + 1)
        rows += x[..., 0].flatten().tolist()
    return rows


def test_an_epoch_reads_every_window_of_every_shard_once(tmp_path):
    sources = counting_shards(tmp_path, [12, 8, 4])  # 3, 2 and 1 steps of 4 windows
    loader = gpt2_loader(sources, 2, 8, 2, seed=5)
    every_window = sorted(1000 * shard + 8 * w for shard, n in enumerate([12, 8, 4]) for w in range(n))
    for epoch in range(2):
        assert loader.epoch == epoch
        assert sorted(epoch_rows(loader, 6)) == every_window


def test_window_order_changes_with_the_seed_and_the_epoch(tmp_path):
    sources = counting_shards(tmp_path, [64])  # one shard, so only the order within it can change
    seed_1, seed_2 = gpt2_loader(sources, 4, 8, 1, seed=1), gpt2_loader(sources, 4, 8, 1, seed=2)
    epoch_0, epoch_1 = epoch_rows(seed_1, 16), epoch_rows(seed_1, 16)
    assert sorted(epoch_0) == sorted(epoch_1) and epoch_0 != epoch_1
    assert epoch_rows(seed_2, 16) != epoch_0
    assert epoch_rows(gpt2_loader(sources, 4, 8, 1, seed=1), 16) == epoch_0


def test_sequential_mode_reads_each_shard_front_to_back(tmp_path):
    make_shards(tmp_path, [300])
    sources = load_token_sources(tmp_path, "train", GPT2)
    tokens = torch.from_numpy(sources[0][1].astype(np.int64))
    loader = gpt2_loader(sources, 2, 8, 2, shuffle=False)
    for step in [0, 1, 2, 3, 4, 5, 6, 7, 8, 0]:  # 9 steps of 32 tokens (and the +1 target) fit; then a new epoch
        x, y = loader.next_batch()
        span = tokens[32 * step:32 * step + 33]
        assert torch.equal(x.flatten(), span[:-1]) and torch.equal(y.flatten(), span[1:])


def shard_visits(loader, steps):
    visits = []
    for _ in range(steps):
        visits.append((loader.epoch, loader.order[loader.shard]))
        loader.next_batch()
    return visits


def test_shards_are_visited_in_a_seeded_order_that_changes_every_epoch(tmp_path):
    make_shards(tmp_path, [33] * 6)  # one 32-token global batch per shard
    sources = load_token_sources(tmp_path, "train", GPT2)
    visits = shard_visits(gpt2_loader(sources, 4, 8, 1, seed=3), 18)
    epochs = [[shard for epoch, shard in visits if epoch == e] for e in range(3)]
    assert all(sorted(order) == list(range(6)) for order in epochs)
    assert len({tuple(order) for order in epochs}) == 3
    assert visits == shard_visits(gpt2_loader(sources, 4, 8, 1, seed=3), 18)
    assert visits != shard_visits(gpt2_loader(sources, 4, 8, 1, seed=4), 18)


@pytest.mark.parametrize("shuffle", [True, False], ids=["shuffled", "sequential"])
def test_loader_state_resumes_the_same_batches_across_an_epoch_boundary(tmp_path, shuffle):
    make_shards(tmp_path, [200, 150, 90])  # 6 + 4 + 2 steps of 32 tokens an epoch
    sources = load_token_sources(tmp_path, "train", GPT2)
    loader = gpt2_loader(sources, 2, 8, 2, seed=1, shuffle=shuffle)
    for _ in range(7):
        loader.next_batch()
    state = loader.state_dict()
    expected = [loader.next_batch()[0] for _ in range(10)]
    assert (state["epoch"], loader.epoch) == (0, 1)
    resumed = gpt2_loader(sources, 2, 8, 2, seed=1, shuffle=shuffle)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, resumed.next_batch()[0]) for a in expected)


def test_a_sequential_state_resumes_sequentially_whatever_the_loader_was_built_with(tmp_path):
    make_shards(tmp_path, [200, 150, 90])
    sources = load_token_sources(tmp_path, "train", GPT2)
    old = gpt2_loader(sources, 2, 8, 2, seed=1, shuffle=False)
    for _ in range(3):
        old.next_batch()
    state = old.state_dict()
    resumed = gpt2_loader(sources, 2, 8, 2, seed=1)
    resumed.load_state_dict(state)
    assert not resumed.shuffle
    assert all(torch.equal(old.next_batch()[0], resumed.next_batch()[0]) for _ in range(10))


def test_resuming_on_different_data_is_refused(tmp_path):
    make_shards(tmp_path, [200, 150])
    state = gpt2_loader(load_token_sources(tmp_path, "train", GPT2), 2, 8, 1).state_dict()
    make_shards(tmp_path, [200, 151])
    with pytest.raises(UserError, match="differs from the checkpoint"):
        gpt2_loader(load_token_sources(tmp_path, "train", GPT2), 2, 8, 1).load_state_dict(state)


@pytest.mark.parametrize("size", [300, 200_000])  # small, and large enough for 64 samples to miss a change
def test_a_shard_changed_anywhere_in_place_is_refused_when_a_resumed_run_reads_it(tmp_path, size):
    make_shards(tmp_path, [size], seed=0)
    loader = gpt2_loader(load_token_sources(tmp_path, "train", GPT2), 2, 8, 1)
    loader.next_batch()  # the shard is fingerprinted at its first read
    state = loader.state_dict()
    tokens = open_shard(tmp_path / "test_train_000000.bin").copy()
    before = sampled_fingerprint(tokens)
    tokens[size // 2:size // 2 + 100] = (tokens[size // 2:size // 2 + 100] + 1) % 50257  # same size
    write_shard(tmp_path / "test_train_000000.bin", tokens)
    if size > 4 * 64 * 256:
        assert sampled_fingerprint(tokens) == before  # what checkpoints kept before: blind to this change
    resumed = gpt2_loader(load_token_sources(tmp_path, "train", GPT2), 2, 8, 1)
    resumed.load_state_dict(state)
    with pytest.raises(UserError, match="test_train_000000.bin differs from when the run first read it"):
        resumed.next_batch()


def test_a_changed_shard_is_refused_when_the_resumed_run_reaches_it_and_not_before(tmp_path):
    make_shards(tmp_path, [40, 40], seed=0)  # 2 steps of 16 tokens each
    loader = gpt2_loader(load_token_sources(tmp_path, "train", GPT2), 2, 8, 1, shuffle=False)
    for _ in range(4):  # the first epoch: both shards read
        loader.next_batch()
    state = loader.state_dict()
    assert all(state["fingerprints"])
    first = loader.names[loader.order[0]]  # the next epoch's first shard
    later = next(name for name in loader.names if name != first)
    tokens = open_shard(tmp_path / later).copy()
    tokens[20] = (tokens[20] + 1) % 50257
    write_shard(tmp_path / later, tokens)
    resumed = gpt2_loader(load_token_sources(tmp_path, "train", GPT2), 2, 8, 1, shuffle=False)
    resumed.load_state_dict(state)
    resumed.next_batch()
    resumed.next_batch()
    with pytest.raises(UserError, match=f"{later} differs"):
        resumed.next_batch()


def test_a_checkpoint_of_sampled_fingerprints_still_resumes(tmp_path):
    make_shards(tmp_path, [200_000], seed=0)
    sources = load_token_sources(tmp_path, "train", GPT2)
    loader = gpt2_loader(sources, 2, 8, 1)
    loader.next_batch()
    state = {**loader.state_dict(), "fingerprints": [sampled_fingerprint(sources[0][1])]}
    expected = loader.next_batch()[0]
    resumed = gpt2_loader(sources, 2, 8, 1)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.next_batch()[0], expected)


def test_a_loader_resumes_in_its_checkpoints_seed_order_whatever_it_read_before(tmp_path):
    make_shards(tmp_path, [400], seed=0)
    sources = load_token_sources(tmp_path, "train", GPT2)
    run = gpt2_loader(sources, 2, 8, 1, seed=1)
    run.next_batch()
    state = run.state_dict()
    expected = [run.next_batch()[0] for _ in range(10)]
    resumed = gpt2_loader(sources, 2, 8, 1, seed=2)  # a resume given another --seed
    resumed.next_batch()  # a batch read ahead, as the trainer's prefetcher does before restoring
    resumed.load_state_dict(state)
    assert all(torch.equal(a, resumed.next_batch()[0]) for a in expected)


def test_data_shorter_than_one_global_batch_is_refused(tmp_path):
    make_shards(tmp_path, [64])
    with pytest.raises(UserError, match="shorter than one global batch"):
        gpt2_loader(load_token_sources(tmp_path, "train", GPT2), 4, 8, 2)


def test_val_batches_are_fixed_and_capped_by_the_data(tmp_path):
    make_shards(tmp_path, [100, 50], split="val")
    sources = load_token_sources(tmp_path, "val", GPT2)
    # a batch is 2 x 8 tokens plus the one target after them: 100 tokens hold 6, 50 hold 3
    assert val_batch_positions(sources, 2, 8, 100) == [(0, 0), (0, 16), (0, 32), (0, 48), (0, 64), (0, 80),
                                                        (1, 0), (1, 16), (1, 32)]
    assert val_batch_positions(sources, 2, 8, 3) == [(0, 0), (0, 16), (0, 32)]
    with pytest.raises(UserError, match="val data"):
        val_batch_positions(sources, 8, 32, 10)


def test_a_text_file_is_tokenized_and_split_90_10():
    (train_name, train), = load_token_sources(INPUT_TXT, "train", GPT2)
    (val_name, val), = load_token_sources(INPUT_TXT, "val", GPT2)
    assert len(train) + len(val) == 338_025
    assert len(train) == int(0.9 * 338_025)
    assert "train" in train_name and "val" in val_name


def test_missing_data_directory_and_missing_shards_name_the_fix(tmp_path):
    with pytest.raises(UserError, match="fineweb.py"):
        load_token_sources(tmp_path / "nowhere", "train", GPT2)
    with pytest.raises(UserError, match="no train shards"):
        load_token_sources(tmp_path, "train", GPT2)


@pytest.mark.parametrize("kind", ["directory", "dangling link"])
def test_a_name_like_a_shards_that_is_no_file_is_one_line(tmp_path, kind):
    make_shards(tmp_path, [200])
    odd = tmp_path / "test_train_000001.bin"
    odd.mkdir() if kind == "directory" else odd.symlink_to(tmp_path / "gone.bin")
    with pytest.raises(UserError, match=f"{odd} is named like a train shard but is"):
        load_token_sources(tmp_path, "train", GPT2)
