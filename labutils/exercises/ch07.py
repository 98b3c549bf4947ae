"""Notebook 07 (tensor parallelism): cutting a weight by output rows and by input columns, the
collectives per token, and the predicted time per token."""
from __future__ import annotations

import torch

from . import case, exercise


def _split(n: int, world: int, rank: int) -> tuple[int, int]:
    """Rank's contiguous share of n, balanced: the first n % world ranks get one more (labutils.tp.split_range)."""
    base, extra = divmod(n, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


def _randint(lo: int, hi: int, g: torch.Generator) -> int:
    return int(torch.randint(lo, hi, (), generator=g))


def _weight(out_features: int, in_features: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(out_features, in_features, generator=g)


def ref_column_shard(W: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    lo, hi = _split(W.shape[0], world, rank)
    return W[lo:hi].clone()


def ref_row_shard(W: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    lo, hi = _split(W.shape[1], world, rank)
    return W[:, lo:hi].clone()


_SPLIT_HINT = ("contiguous and balanced: with n = q * world + e, ranks 0 .. e-1 get q + 1, the others q; rank r "
               "starts at r * q + min(r, e)")


@exercise("column_shard", reference=ref_column_shard,
          hint="a column-parallel layer keeps rank's share of the *outputs*: W is (out_features, in_features), "
               "so that is a range of W's rows; " + _SPLIT_HINT)
def _column_cases(g):
    yield case("q_proj-like, 2 ranks, rank 0", _weight(8, 6, g), 0, 2)
    yield case("2 ranks, rank 1", _weight(8, 6, g), 1, 2)
    yield case("one rank: the whole weight", _weight(5, 3, g), 0, 1)
    yield case("9 rows over 2 ranks: rank 0 gets 5", _weight(9, 4, g), 0, 2)
    yield case("9 rows over 2 ranks: rank 1 gets 4", _weight(9, 4, g), 1, 2)
    yield case("10 rows over 4 ranks, rank 2", _weight(10, 3, g), 2, 4)
    for _ in range(3):
        world = _randint(1, 6, g)
        yield case("random shape and rank", _weight(_randint(world, 20, g), _randint(1, 9, g), g),
                   _randint(0, world, g), world)


@exercise("row_shard", reference=ref_row_shard,
          hint="a row-parallel layer keeps rank's share of the *inputs*: W is (out_features, in_features), so "
               "that is a range of W's columns, W[:, lo:hi]; " + _SPLIT_HINT)
def _row_cases(g):
    yield case("o_proj-like, 2 ranks, rank 0", _weight(6, 8, g), 0, 2)
    yield case("2 ranks, rank 1", _weight(6, 8, g), 1, 2)
    yield case("one rank: the whole weight", _weight(3, 5, g), 0, 1)
    yield case("9 columns over 2 ranks: rank 0 gets 5", _weight(4, 9, g), 0, 2)
    yield case("9 columns over 2 ranks: rank 1 gets 4", _weight(4, 9, g), 1, 2)
    yield case("a square weight, 3 ranks, rank 2", _weight(7, 7, g), 2, 3)
    for _ in range(3):
        world = _randint(1, 6, g)
        yield case("random shape and rank", _weight(_randint(1, 9, g), _randint(world, 20, g), g),
                   _randint(0, world, g), world)


def ref_allreduces_per_token(n_layer: int, world: int) -> int:
    return 0 if world == 1 else 2 * n_layer


@exercise("allreduces_per_token", reference=ref_allreduces_per_token,
          hint="each layer has two row-parallel layers (o_proj after attention, down_proj after the MLP), each "
               "followed by one all-reduce; a single GPU has nothing to reduce")
def _allreduce_cases(g):
    yield case("Qwen2.5-7B on 2 GPUs", 28, 2)
    yield case("Llama-3-70B on 8 GPUs", 80, 8)
    yield case("one GPU", 28, 1)
    yield case("one layer, 2 GPUs", 1, 2)
    yield case("the count does not grow with the GPUs", 32, 4)
    for _ in range(3):
        yield case("random", _randint(1, 100, g), _randint(1, 9, g))


def ref_predicted_ms_per_token(weight_bytes: float, world: int, copy_gbps: float, n_layer: int,
                               allreduce_us: float) -> float:
    read_ms = weight_bytes / world / (copy_gbps * 1e9) * 1e3
    comm_ms = ref_allreduces_per_token(n_layer, world) * allreduce_us * 1e-3
    return read_ms + comm_ms


@exercise("predicted_ms_per_token", reference=ref_predicted_ms_per_token,
          hint="each GPU reads weight_bytes / world at copy_gbps (GB/s = 1e9 bytes/s), then waits for every "
               "all-reduce in turn: 2 * n_layer of them when world > 1 (none on one GPU); answer in ms")
def _predicted_cases(g):
    yield case("7B twin on one H200", 15.2e9, 1, 4300.0, 28, 10.0)
    yield case("7B twin on 2 H200s", 15.2e9, 2, 4300.0, 28, 10.0)
    yield case("70B twin on 2 GPUs", 141e9, 2, 4300.0, 80, 12.0)
    yield case("70B twin on 8 GPUs", 141e9, 8, 4300.0, 80, 15.0)
    yield case("free collectives", 8e9, 4, 2000.0, 32, 0.0)
    for _ in range(3):
        yield case("random", float(_randint(1, 200, g)) * 1e9, _randint(1, 9, g), float(_randint(500, 5000, g)),
                   _randint(1, 100, g), float(_randint(1, 40, g)))
