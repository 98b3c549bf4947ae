"""Notebook 07's exercises: plausible wrong answers fail, naming the case that shows the mistake;
the references agree with labutils.tp."""
from __future__ import annotations

import pytest
import torch

from conftest import assert_fails_naming_the_case
from labutils import tp
from labutils.exercises import EXERCISES, check
from labutils.exercises import ch07

NAMES = {"column_shard", "row_shard", "allreduces_per_token", "predicted_ms_per_token"}


def test_notebook_07_exercises_are_registered():
    assert NAMES <= set(EXERCISES)


def test_the_references_pass_their_own_checks():
    for name in NAMES:
        assert check(name, EXERCISES[name].reference)


# ---- wrong answers ------------------------------------------------------------------------------------------------
def _columns_instead(W, rank, world):
    """The input columns: a row-parallel cut where a column-parallel one is asked for."""
    return ch07.ref_row_shard(W, rank, world)


def _floor_split(W, rank, world):
    """n // world rows each: the remainder is lost."""
    q = W.shape[0] // world
    return W[rank * q:(rank + 1) * q].clone()


def _last_rank_takes_rest(W, rank, world):
    """n // world each and the remainder on the last rank: not balanced."""
    q = W.shape[0] // world
    return W[rank * q:(rank + 1) * q if rank < world - 1 else W.shape[0]].clone()


def _strided_rows(W, rank, world):
    """Every world-th row: an interleaved split, not a contiguous one."""
    return W[rank::world].clone()


def _rows_instead(W, rank, world):
    return ch07.ref_column_shard(W, rank, world)


def _one_per_layer(n_layer, world):
    return 0 if world == 1 else n_layer


def _always(n_layer, world):
    return 2 * n_layer


def _grows_with_world(n_layer, world):
    return 2 * n_layer * (world - 1)


def _comm_split_too(weight_bytes, world, copy_gbps, n_layer, allreduce_us):
    """The all-reduce time divided by the GPUs as well: collectives are not split."""
    return weight_bytes / world / (copy_gbps * 1e9) * 1e3 + (2 * n_layer * allreduce_us * 1e-3 if world > 1 else 0) / world


def _no_world_split(weight_bytes, world, copy_gbps, n_layer, allreduce_us):
    return weight_bytes / (copy_gbps * 1e9) * 1e3 + (2 * n_layer * allreduce_us * 1e-3 if world > 1 else 0)


def _microseconds(weight_bytes, world, copy_gbps, n_layer, allreduce_us):
    """The collectives left in microseconds."""
    return weight_bytes / world / (copy_gbps * 1e9) * 1e3 + (2 * n_layer * allreduce_us if world > 1 else 0)


WRONG = [("column_shard", _columns_instead, "q_proj-like, 2 ranks, rank 0", "shape mismatch"),
         ("column_shard", _floor_split, "9 rows over 2 ranks: rank 0 gets 5", "shape mismatch"),
         ("column_shard", _last_rank_takes_rest, "9 rows over 2 ranks: rank 0 gets 5", "shape mismatch"),
         ("column_shard", _strided_rows, "q_proj-like, 2 ranks, rank 0", "elements differ"),
         ("row_shard", _rows_instead, "o_proj-like, 2 ranks, rank 0", "shape mismatch"),
         ("allreduces_per_token", _one_per_layer, "Qwen2.5-7B on 2 GPUs", "got 28, expected 56"),
         ("allreduces_per_token", _always, "one GPU", "got 56, expected 0"),
         ("allreduces_per_token", _grows_with_world, "Llama-3-70B on 8 GPUs", "expected 160"),
         ("predicted_ms_per_token", _comm_split_too, "7B twin on 2 H200s", "expected"),
         ("predicted_ms_per_token", _no_world_split, "7B twin on 2 H200s", "expected"),
         ("predicted_ms_per_token", _microseconds, "7B twin on 2 H200s", "expected")]


@pytest.mark.parametrize("name, fn, label, detail", WRONG, ids=[w[1].__name__ for w in WRONG])
def test_wrong_answer_fails_naming_the_case(name, fn, label, detail, capsys):
    assert_fails_naming_the_case(name, fn, label, detail, capsys)


# ---- the references against the package ---------------------------------------------------------------------------
@pytest.mark.parametrize("n, world", [(9, 2), (9, 4), (28, 8), (18944, 2), (5, 5)])
def test_the_split_is_the_packages(n, world):
    assert [ch07._split(n, world, r) for r in range(world)] == [tp.split_range(n, world, r) for r in range(world)]


def test_column_and_row_shards_are_what_the_package_cuts():
    cfg = tp.twin_config("SmolLM2-135M", num_hidden_layers=1)
    g = torch.Generator().manual_seed(0)
    up = torch.randn(cfg.intermediate_size, cfg.hidden_size, generator=g)
    down = torch.randn(cfg.hidden_size, cfg.intermediate_size, generator=g)
    for s in tp.plan(cfg, 4):
        assert torch.equal(ch07.ref_column_shard(up, s.rank, 4), tp.shard_tensor("layers.0.mlp.up_proj.weight", up, cfg, s))
        assert torch.equal(ch07.ref_row_shard(down, s.rank, 4), tp.shard_tensor("layers.0.mlp.down_proj.weight", down, cfg, s))


def test_the_simple_prediction_is_the_packages_without_replicated_parts():
    """The exercise splits all bytes evenly; the package counts what each rank really holds (the
    embedding row, norms and KV heads replicated): equal up to those, within 1% for Llama-3-70B on 2."""
    cfg = tp.twin_config("Llama-3-70B")
    assert ch07.ref_allreduces_per_token(cfg.n_layer, 2) == tp.collectives_per_token(cfg, 2)["all_reduce"]
    full = tp.bytes_per_gpu(cfg, 1)
    simple = ch07.ref_predicted_ms_per_token(full, 2, 4000.0, cfg.n_layer, 10.0)
    exact = tp.predicted_ms(cfg, 2, 4000.0, 10.0, 0.0)["ms"]
    assert simple == pytest.approx(exact, rel=0.01)
