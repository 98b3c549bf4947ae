"""Tensor parallelism for the lab decoder (notebook 07): Megatron-style, through the linear-layer seam.

W ranks (one process per GPU; on a CPU, processes joined by gloo) each hold a slice of every layer
and run the same decode step on the same tokens. The contract, for rank r of W::

  column-parallel  q_proj, k_proj, v_proj, gate_proj, up_proj: a plain nn.Linear holding rank r's
                   *output rows* (its query heads, the KV heads those read, its slice of the FFN).
                   No communication: attention and SwiGLU need only the rank's own heads / columns.
  row-parallel     o_proj, down_proj: ``RowParallelLinear`` holding rank r's *input columns* (the
                   same heads / FFN slice). x_r (B, T, in / W) @ W_r^T is a partial (B, T, d); one
                   all-reduce (sum) over the ranks completes it. A bias is added once, after the sum.
                   Two all-reduces per layer, of B * T * d elements each.
  heads            query heads in contiguous ranges, balanced (sizes differ by at most one: 9 heads on
                   2 ranks are 5 + 4). Query head h reads KV head h // (n_head / n_kv_head); every rank
                   holds the KV heads its query heads read, so a KV head read from two ranks is held
                   by both (replicated: always when n_kv_head < W). If a rank's query heads do not fall
                   into equal groups over its KV heads, that rank stores one KV head per query head
                   (rows repeated), so the attention contract (labutils.attention) holds on every rank.
                   Nothing is refused except W > n_head (a rank without a head).
  embedding        replicated: a lookup reads B * T rows of the table, not the table.
  lm_head          split by vocabulary rows (``VocabParallelHead``, slices padded to one length);
                   the logit slices are all-gathered, so every rank has the whole (B, T, vocab) row
                   and takes the same argmax. One all-gather per step.
  norms            replicated (d elements each).

Per decode step: 2 * n_layer all-reduces + 1 all-gather. ``shard_decoder(model, rank, W, group)``
cuts a full decoder (CPU tests, the notebook's check); ``twin_shard(name, rank, W, group)`` builds
one rank's shard of a shape twin directly on its device with seeded random weights, so a 70B twin
never exists whole on one GPU. The rank-local decoder is an ordinary ``Decoder`` (its cfg holds the
local head counts and FFN width), so ``fuse_projections``, the KV-cache seam and ``DecodeEngine``
(CUDA graphs, compiled layers) work on it unchanged; the collectives are functional
(``torch.distributed._functional_collectives``): torch.compile traces them and a CUDA graph records them.

Launching: ``launch("check", world=2)`` runs ``torchrun -m labutils.tp check`` on 2 processes and
returns rank 0's JSON (a notebook cell or a test calls it); on the command line
``python -m labutils.tp check --world 2`` (gloo on a CPU, NCCL on GPUs), ``... allreduce --world 2``
and ``... bench --world 2 --model Qwen2.5-7B``. ``benchmark()`` runs the GPU measurements of
notebook 07 (scripts/gpu/tp_bench.py).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, replace
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed import _functional_collectives as funcol

from .decoder import Decoder, DecoderConfig

REPO = Path(__file__).resolve().parent.parent
# NVLink multicast stays off in NCCL, PyTorch and NVSHMEM: on the lent multi-GPU machines a program
# that uses it can put the host's shared GPUs out of service. Set for every process launched here.
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # split by output rows
ROW = ("o_proj", "down_proj")  # split by input columns, all-reduce after


# ---- the plan: which heads, FFN columns and vocabulary rows each rank holds -----------------------------
def split_range(n: int, world: int, rank: int) -> tuple[int, int]:
    """Rank's contiguous share [lo, hi) of n items, balanced: the first n % world ranks get one more."""
    base, extra = divmod(n, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


@dataclass(frozen=True)
class RankShard:
    rank: int
    world: int
    heads: tuple[int, int]        # query heads [h0, h1)
    kv_heads: tuple[int, ...]     # the global KV head behind each local KV head (a head may repeat)
    ffn: tuple[int, int]          # FFN (intermediate) columns [f0, f1)
    vocab: tuple[int, int]        # lm_head rows [v0, v1)
    vocab_per_rank: int           # rows of every rank's lm_head slice (the last one zero-padded)

    @property
    def n_head(self) -> int:
        return self.heads[1] - self.heads[0]

    @property
    def n_kv_head(self) -> int:
        return len(self.kv_heads)


def plan(cfg: DecoderConfig, world: int) -> list[RankShard]:
    """One RankShard per rank: the heads, KV heads, FFN columns and vocabulary rows it holds."""
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"world must be an integer >= 1, got {world!r}")
    if world > cfg.n_head:
        raise ValueError(f"{world} ranks but {cfg.n_head} query heads: a rank would hold no head; "
                         f"use at most {cfg.n_head} ranks")
    group = cfg.n_head // cfg.n_kv_head  # query heads per KV head
    per_rank = -(-cfg.vocab_size // world)
    shards = []
    for r in range(world):
        h0, h1 = split_range(cfg.n_head, world, r)
        reads = [h // group for h in range(h0, h1)]  # the KV head each local query head reads
        own = sorted(set(reads))
        g = len(reads) // len(own)
        if len(reads) % len(own) or any(reads[i] != own[i // g] for i in range(len(reads))):
            own = reads  # the heads do not group evenly here: one KV head per query head
        v0 = min(r * per_rank, cfg.vocab_size)
        shards.append(RankShard(r, world, (h0, h1), tuple(own), split_range(cfg.intermediate_size, world, r),
                                (v0, min(v0 + per_rank, cfg.vocab_size)), per_rank))
    return shards


def local_config(cfg: DecoderConfig, shard: RankShard) -> DecoderConfig:
    """The rank-local decoder's config: its head counts and FFN width; vocab_size stays the model's
    (token ids and the gathered logits span the whole vocabulary); the lm_head is never tied."""
    return replace(cfg, n_head=shard.n_head, n_kv_head=shard.n_kv_head,
                   intermediate_size=shard.ffn[1] - shard.ffn[0], tie_embeddings=False)


def _rows(proj: str, cfg: DecoderConfig, shard: RankShard):
    """Output rows of a column-parallel projection that rank holds (a slice, or an index tensor)."""
    hd = cfg.head_dim
    if proj == "q_proj":
        return slice(shard.heads[0] * hd, shard.heads[1] * hd)
    if proj in ("k_proj", "v_proj"):
        return torch.cat([torch.arange(k * hd, (k + 1) * hd) for k in shard.kv_heads])
    return slice(*shard.ffn)  # gate_proj, up_proj


def _cols(proj: str, cfg: DecoderConfig, shard: RankShard) -> slice:
    """Input columns of a row-parallel projection that rank holds."""
    if proj == "o_proj":
        return slice(shard.heads[0] * cfg.head_dim, shard.heads[1] * cfg.head_dim)
    return slice(*shard.ffn)  # down_proj


def shard_tensor(name: str, t: torch.Tensor, cfg: DecoderConfig, shard: RankShard) -> torch.Tensor:
    """Rank's part of the full decoder's parameter ``name`` (embedding and norms whole, shared)."""
    parts = name.split(".")
    proj, leaf = (parts[-2], parts[-1]) if len(parts) >= 2 else (None, None)
    if proj in COLUMN:
        return t[_rows(proj, cfg, shard)].contiguous()  # weight rows, or the bias entries of those rows
    if proj in ROW:
        return t[:, _cols(proj, cfg, shard)].contiguous() if leaf == "weight" else t  # a bias: whole, added once
    if name == "lm_head.weight":
        rows = t[shard.vocab[0]:shard.vocab[1]]
        return F.pad(rows, (0, 0, 0, shard.vocab_per_rank - rows.shape[0])).contiguous()
    return t


# ---- the collectives and the two parallel modules ------------------------------------------------------
def _group_name(group):
    """A process group by its name (a string: a constant to torch.compile), or None."""
    return getattr(group, "group_name", group)


def _process_group(group):
    return dist.distributed_c10d._resolve_process_group(group) if isinstance(group, str) else group


def all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    """Sum of x over the ranks of ``group`` (a ProcessGroup or its name). Eagerly (also while a CUDA
    graph records) in place, into x: x must be a fresh tensor (a partial product). While torch.compile
    traces, the functional collective, which Inductor lowers to the same in-place NCCL call."""
    if torch.compiler.is_compiling():
        return funcol.all_reduce(x, "sum", _group_name(group))
    dist.all_reduce(x, group=_process_group(group))
    return x


def all_gather(x: torch.Tensor, group) -> torch.Tensor:
    """The ranks' x stacked along a new first dimension: (W, *x.shape)."""
    if torch.compiler.is_compiling():
        return _gather(x[None], 0, _group_name(group))
    group = _process_group(group)
    W = dist.get_world_size(group)
    out = x.new_empty(W * x.shape[0], *x.shape[1:])  # the ranks' x concatenated (gloo takes only this form)
    dist.all_gather_into_tensor(out, x.contiguous(), group=group)
    return out.view(W, *x.shape)


_gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor  # renamed in torch 2.12


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_r W_r^T) + b: rank r's input columns W_r (out, in / W); the bias (the whole
    of it) is added once, after the sum, so it is not counted W times."""

    def __init__(self, linear: nn.Linear, world: int, group=None):
        super().__init__()
        self.weight = linear.weight  # (d_out, d_in / W)
        self.register_parameter("bias", linear.bias)
        self.world, self.group = world, _group_name(group)

    def forward(self, x):
        y = F.linear(x, self.weight)  # (B, T, d_out): this rank's partial sum
        if self.world > 1:
            if self.group is None:
                raise RuntimeError("a row-parallel shard of a world > 1 needs its process group to all-reduce")
            y = all_reduce(y, self.group)  # (B, T, d_out): the sum over the ranks
        return y if self.bias is None else y + self.bias

    def extra_repr(self):
        return f"in_features={self.weight.shape[1]} (of {self.world}), out_features={self.weight.shape[0]}, " \
               f"bias={self.bias is not None}"


class VocabParallelHead(nn.Module):
    """logits = all_gather(h W_r^T): rank r's vocabulary rows W_r (vocab_per_rank, d), the ranks'
    slices gathered into the whole (B, T, vocab) on every rank."""

    def __init__(self, linear: nn.Linear, vocab_size: int, world: int, group=None):
        super().__init__()
        self.weight = linear.weight  # (vocab_per_rank, d), zero rows past the vocabulary
        self.vocab_size, self.world, self.group = vocab_size, world, _group_name(group)

    def forward(self, h):
        logits = F.linear(h, self.weight)  # (B, T, vocab_per_rank)
        if self.world > 1:
            if self.group is None:
                raise RuntimeError("a vocabulary-parallel head of a world > 1 needs its process group to all-gather")
            B, T, Vr = logits.shape
            parts = all_gather(logits.reshape(B * T, Vr), self.group)  # (W, B * T, Vr)
            logits = parts.permute(1, 0, 2).reshape(B, T, self.world * Vr)  # rank order = vocabulary order
        return logits[..., :self.vocab_size]

    def extra_repr(self):
        return f"vocab rows={self.weight.shape[0]} per rank (of {self.vocab_size}), d={self.weight.shape[1]}"


def parallelize(local: Decoder, shard: RankShard, group=None) -> Decoder:
    """Seam 3 on a rank-local decoder: o_proj / down_proj become RowParallelLinear, the lm_head a
    VocabParallelHead; q/k/v and gate/up stay plain linears (their rows are already the rank's)."""
    V = local.cfg.vocab_size

    def make(name, linear):
        if name.endswith(ROW):
            return RowParallelLinear(linear, shard.world, group)
        if name == "lm_head":
            return VocabParallelHead(linear, V, shard.world, group)
        return linear

    local.swap_linears(make)
    local.tp = shard
    return local


def _empty_local(cfg: DecoderConfig, shard: RankShard, attention="sdpa") -> Decoder:
    """The rank-local decoder on the meta device (nothing allocated)."""
    with torch.device("meta"):
        local = Decoder(local_config(cfg, shard), attention=attention)
        local.lm_head = nn.Linear(cfg.hidden_size, shard.vocab_per_rank, bias=False)
    return local


@torch.no_grad()
def shard_decoder(model: Decoder, rank: int, world: int, group=None) -> Decoder:
    """Rank ``rank``'s decoder, cut from the full ``model`` (unfused; fuse the shard afterwards).
    Embedding and norms share the full model's tensors; the sliced weights are copies."""
    if any(hasattr(layer.self_attn, "qkv_proj") for layer in model.layers):
        raise ValueError("shard the decoder before fuse_projections (its q/k/v rows are split per head); "
                         "call local.fuse_projections() on the shard instead")
    cfg = model.cfg
    shard = plan(cfg, world)[rank]
    local = _empty_local(cfg, shard, attention=model.attn_fn)
    state = {name: shard_tensor(name, t, cfg, shard) for name, t in model.state_dict().items()}
    local.load_state_dict(state, strict=True, assign=True)
    return parallelize(local.eval(), shard, group)


def twin_config(name: str, **overrides) -> DecoderConfig:
    """The DecoderConfig of architecture ``name`` in labutils.configs (``overrides``: fields to change,
    e.g. num_hidden_layers=2 for a smoke run; the result is then no longer that architecture's twin)."""
    from . import configs

    fields = configs.arch(name)
    unknown = set(overrides) - set(fields)
    if unknown:
        raise ValueError(f"unknown config fields {sorted(unknown)} for {name}; known: {sorted(fields)}")
    return DecoderConfig.from_hf(SimpleNamespace(**{**fields, **overrides}))


@torch.no_grad()
def twin_shard(cfg: DecoderConfig | str, rank: int, world: int, group=None, dtype=torch.bfloat16,
               device=None, seed: int = 0, std: float = 0.02) -> Decoder:
    """Rank ``rank``'s shard of a random-weight shape twin, built directly on ``device``: weights
    N(0, std) from a generator seeded by (seed, rank), norms 1, biases 0. The full model is never
    materialized (a 70B twin's shards fit on two GPUs; the whole would not fit on one). Raises
    MemoryError before allocating when the shard would not fit."""
    cfg = twin_config(cfg) if isinstance(cfg, str) else cfg
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shard = plan(cfg, world)[rank]
    local = _empty_local(cfg, shard).to(dtype)
    need = sum(p.numel() for p in local.parameters()) * dtype.itemsize
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        if need > 0.95 * free:
            raise MemoryError(f"rank {rank}'s shard needs {need / 2**30:.1f} GiB, {device} has {free / 2**30:.1f} GiB free")
    local.to_empty(device=device)
    gen = torch.Generator(device).manual_seed(1_000_003 * seed + rank)
    for name, p in local.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif name.endswith(".bias"):
            p.zero_()
        else:
            p.normal_(0.0, std, generator=gen)  # in place, in dtype: no full-size fp32 temporary
    local.lm_head.weight[shard.vocab[1] - shard.vocab[0]:].zero_()  # padding rows past the vocabulary
    return parallelize(local.eval(), shard, group)


# ---- bytes and the cost model ---------------------------------------------------------------------------
def rank_bytes(cfg: DecoderConfig, shard: RankShard, dtype_bytes: int = 2) -> int:
    """Bytes one decode step reads on that rank: its projections (and biases), its lm_head rows,
    the norms and one embedding row (batch 1). The KV cache is left out (at the benchmark's ~150
    positions it is under 0.1% of the weights)."""
    d, hd, L = cfg.hidden_size, cfg.head_dim, cfg.n_layer
    q, kv, f = shard.n_head * hd, shard.n_kv_head * hd, shard.ffn[1] - shard.ffn[0]
    attn = d * q + 2 * d * kv + q * d + (q + 2 * kv if cfg.qkv_bias else 0) + (d if cfg.o_bias else 0)
    mlp = 3 * d * f
    params = L * (attn + mlp + 2 * d) + d + shard.vocab_per_rank * d + d
    return params * dtype_bytes


def bytes_per_gpu(cfg: DecoderConfig, world: int, dtype_bytes: int = 2) -> int:
    """The most any rank reads per step: the slowest rank sets the pace."""
    return max(rank_bytes(cfg, s, dtype_bytes) for s in plan(cfg, world))


def collectives_per_token(cfg: DecoderConfig, world: int) -> dict:
    """All-reduces (after o_proj and after down_proj, every layer) and all-gathers (the logits) per step."""
    if world == 1:
        return {"all_reduce": 0, "all_gather": 0}
    return {"all_reduce": 2 * cfg.n_layer, "all_gather": 1}


def predicted_ms(cfg: DecoderConfig, world: int, copy_gbps: float, allreduce_us: float,
                 allgather_us: float | None = None, dtype_bytes: int = 2) -> dict:
    """Time per token = bytes per GPU / bandwidth + collectives x their latency (each measured alone)."""
    nbytes = bytes_per_gpu(cfg, world, dtype_bytes)
    n = collectives_per_token(cfg, world)
    read_ms = nbytes / (copy_gbps * 1e9) * 1e3
    comm_ms = (n["all_reduce"] * allreduce_us + n["all_gather"] * (allgather_us if allgather_us is not None
                                                                    else allreduce_us)) * 1e-3
    return {"bytes_per_gpu": nbytes, "read_ms": read_ms, "comm_ms": comm_ms, "ms": read_ms + comm_ms,
            "tok_s": 1e3 / (read_ms + comm_ms), **n}


# ---- processes: setup inside a rank, and the launcher ---------------------------------------------------
def init_distributed(backend: str | None = None, timeout_s: float = 300):
    """Inside a process started by torchrun: join the group. NCCL (one GPU per rank) when GPUs are
    there, else gloo. Returns (rank, world, group, device); a first all-reduce checks the wiring."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        os.environ.update(NCCL_ENV)  # before NCCL reads its environment
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, timeout=timedelta(seconds=timeout_s))
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
    x = torch.ones(1, device=device)
    dist.all_reduce(x)
    if int(x.item()) != world:
        raise RuntimeError(f"the first all-reduce gave {x.item()}, expected {world}")
    return rank, world, dist.group.WORLD, device


def launch(command: str, world: int, *args: str, timeout_s: float = 600, stream: bool = False,
           prefix: str = "") -> dict:
    """Run ``python -m labutils.tp <command> [args]`` on ``world`` processes through torchrun and
    return the JSON that rank 0 wrote. ``stream``: echo the processes' output as it comes (with
    ``prefix``). On a failure or timeout (the whole process group is killed) raises RuntimeError
    with the output's tail."""
    with tempfile.TemporaryDirectory(prefix="labutils-tp-") as tmp:
        out = Path(tmp) / "rank0.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
               "-m", "labutils.tp", command, "--out", str(out), *map(str, args)]
        env = {**os.environ, **NCCL_ENV, "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        env.setdefault("OMP_NUM_THREADS", "1")
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)  # its own group: killed together
        lines: list[str] = []

        def pump():
            for line in proc.stdout:
                lines.append(line)
                if stream and not _noise(line):
                    print(prefix + line, end="", flush=True)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        t0 = time.perf_counter()
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
        reader.join(timeout=5)
        ranks = [l for l in lines if re.match(r"\[rank\d+\]:", l) and not _noise(l)]  # a rank's traceback
        tail = "".join(ranks[-40:] if ranks else [l for l in lines if not _noise(l)][-40:])[-4000:]
        if rc is None:
            raise RuntimeError(f"{command} on {world} processes did not finish in {timeout_s:.0f} s; "
                               f"killed. Output's end:\n{tail}")
        if rc != 0 or not out.is_file():
            raise RuntimeError(f"{command} on {world} processes failed (exit {rc}). Output's end:\n{tail}")
        result = json.loads(out.read_text())
        result["launch_seconds"] = time.perf_counter() - t0
        return result


def _noise(line: str) -> bool:
    """torchrun's OMP_NUM_THREADS banner and warnings: not the program's output."""
    return line.startswith("*****") or "OMP_NUM_THREADS" in line or "Warning" in line or "warn(" in line


# ---- the embedded model without transformers (each rank loads it in ~1 s) -------------------------------
def embedded_decoder(dtype=torch.float32, device="cpu") -> Decoder:
    """The embedded SmolLM2-135M-Instruct as a lab Decoder, read from the safetensors cache that
    labutils.models makes (no transformers import: a rank process starts faster)."""
    from safetensors.torch import load_file

    from .models import _embedded_cache

    path = _embedded_cache()
    cfg = DecoderConfig.from_hf(SimpleNamespace(**json.loads((path / "config.json").read_text())))
    with torch.device("meta"):
        model = Decoder(cfg)
    state = {k.removeprefix("model."): v for k, v in load_file(path / "model.safetensors").items()}
    if cfg.tie_embeddings:  # the cache stores a tied table once, under either name
        state.setdefault("embed_tokens.weight", state.get("lm_head.weight"))
        state.setdefault("lm_head.weight", state["embed_tokens.weight"])
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model.to(device=device, dtype=dtype).eval()


DEFAULT_PROMPT = (1, 504, 3287, 282, 253, 1789, 314, 2189, 30, 378, 1083, 314)  # fixed ids of the embedded vocabulary


# ---- what a rank runs -----------------------------------------------------------------------------------
def _log(rank: int, msg: str):
    if rank == 0:
        print(f"[rank 0] {msg}", flush=True)


def _same_on_all_ranks(value) -> bool:
    got = [None] * dist.get_world_size()
    dist.all_gather_object(got, value)
    return all(v == got[0] for v in got)


@torch.no_grad()
def _worker_check(a, rank, world, group, device) -> dict:
    """The embedded model sharded over the ranks against the whole model on rank 0: prompt logits
    and greedy tokens through a DecodeEngine of mode ``a.mode``."""
    from .engine import DecodeEngine

    dtype = getattr(torch, a.dtype)
    if a.twin:  # a seeded random model, the same on every rank (no model files needed)
        torch.manual_seed(a.seed)
        full = Decoder(twin_config(a.twin, num_hidden_layers=a.layers)).to(device=device, dtype=dtype).eval()
    else:
        full = embedded_decoder(dtype, device)
    ids = torch.tensor([a.prompt_ids], device=device)
    t0 = time.perf_counter()
    local = shard_decoder(full, rank, world, group)
    if a.fuse:
        local.fuse_projections()
    logits = local(ids)  # (1, T, vocab), the same on every rank after the all-gather
    engine = DecodeEngine(local, batch=1, max_seq_len=ids.shape[1] + a.new_tokens + 1, mode=a.mode,
                          regional=a.mode == "compile")
    engine.capture_error_mode = "thread_local"  # NCCL's watchdog thread polls its events during the capture
    tokens = engine.generate(ids, a.new_tokens)[0, ids.shape[1]:].tolist()
    seconds = time.perf_counter() - t0
    identical = _same_on_all_ranks((tokens, logits.double().sum().item()))
    out = {"world": world, "backend": a.backend_name, "dtype": a.dtype, "mode": a.mode, "fused": a.fuse,
           "plan": [asdict(s) for s in plan(full.cfg, world)], "tokens": tokens,
           "identical_on_all_ranks": identical, "prompt_ids": list(a.prompt_ids), "seconds": seconds}
    if rank == 0:
        ref_logits = full(ids)
        ref_tokens = DecodeEngine(full, batch=1, max_seq_len=ids.shape[1] + a.new_tokens + 1,
                                  mode="eager").generate(ids, a.new_tokens)[0, ids.shape[1]:].tolist()
        diff = (logits.double() - ref_logits.double()).abs().max() / ref_logits.double().abs().max()
        out.update(reference_tokens=ref_tokens, tokens_match=tokens == ref_tokens, logits_rel_err=diff.item())
        if a.save:
            torch.save({"logits": logits.cpu(), "tokens": tokens, "prompt_ids": list(a.prompt_ids)}, a.save)
        _log(rank, f"{world} ranks, {a.mode}: tokens {'match' if out['tokens_match'] else 'DIFFER'}, "
                   f"logits max|diff|/max|ref| = {out['logits_rel_err']:.2e}")
    out["model"] = f"{a.twin} twin, {a.layers} layers (random)" if a.twin else "embedded"
    return out


def _time_collective(fn, device, n_graph: int = 64) -> dict:
    """Microseconds per call of ``fn`` (a collective): eager (synchronised per call, as a host loop
    sees it) and replayed from a CUDA graph of n_graph calls (as inside a captured decode step)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(5):
        fn()
    sync()
    dist.barrier()
    reps = 50 if device.type == "cuda" else 20
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e6)
    out = {"eager_us": sorted(times)[len(times) // 2]}
    if device.type == "cuda":
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        sync()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, capture_error_mode="thread_local"):  # NCCL's watchdog thread polls meanwhile
            for _ in range(n_graph):
                fn()
        g.replay()
        sync()
        dist.barrier()
        best = []
        for _ in range(10):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            g.replay()
            end.record()
            end.synchronize()
            best.append(start.elapsed_time(end) * 1e3 / n_graph)
        out["graph_us"] = sorted(best)[len(best) // 2]
    return out


@torch.no_grad()
def _worker_allreduce(a, rank, world, group, device) -> dict:
    """Latency of one all-reduce of a hidden vector (1, 1, d) and one all-gather of a logits slice,
    for each d in a.dims, in a.dtype."""
    dtype = getattr(torch, a.dtype)
    rows = []
    for d, vocab in zip(a.dims, a.vocabs):
        x = torch.randn(1, 1, d, device=device, dtype=dtype)
        buf = x.clone()

        def reduce_once():
            buf.copy_(x)  # in place, fixed buffer: the same call replays from a graph
            dist.all_reduce(buf, group=group)

        part = torch.randn(1, -(-vocab // world), device=device, dtype=dtype)
        gathered = torch.empty(world, part.shape[-1], device=device, dtype=dtype)  # the slices, rank after rank

        def gather_once():
            dist.all_gather_into_tensor(gathered, part, group=group)

        r = _time_collective(reduce_once, device)
        g = _time_collective(gather_once, device)
        rows.append({"d": d, "bytes": d * dtype.itemsize, "allreduce": r, "vocab": vocab,
                     "allgather_bytes": part.numel() * dtype.itemsize, "allgather": g})
        _log(rank, f"all-reduce of {d} x {a.dtype}: {r}; all-gather of {part.numel()}: {g}")
    return {"world": world, "backend": a.backend_name, "dtype": a.dtype, "rows": rows}


@torch.no_grad()
def _worker_bench(a, rank, world, group, device) -> dict:
    """Batch-1 decode tok/s of a shape twin's shards through DecodeEngine, per mode."""
    from .engine import DecodeEngine
    from .hardware import copy_bandwidth_gbps

    dtype = getattr(torch, a.dtype)
    overrides = json.loads(a.overrides) if a.overrides else {}
    cfg = twin_config(a.model, **overrides)
    out = {"model": a.model, "overrides": overrides, "world": world, "backend": a.backend_name, "dtype": a.dtype,
           "new_tokens": a.new_tokens, "prompt_len": a.prompt_len, "modes": {}}
    bw = copy_bandwidth_gbps(2 * 2**30 if device.type == "cuda" and not overrides else 64 * 2**20)
    out["copy_gbps"] = bw["gbps"]
    _log(rank, f"copy bandwidth {bw['gbps']:.0f} GB/s")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    t0 = time.perf_counter()
    model = twin_shard(cfg, rank, world, group, dtype=dtype, device=device, seed=a.seed)
    model.fuse_projections()
    if device.type == "cuda":
        torch.cuda.synchronize()
        out["weights_gib_on_rank0"] = torch.cuda.memory_allocated(device) / 2**30
    dist.barrier()
    out["build_seconds"] = time.perf_counter() - t0
    out["bytes_per_gpu"] = bytes_per_gpu(cfg, world, dtype.itemsize)
    _log(rank, f"{a.model} shard built in {out['build_seconds']:.1f} s "
               f"({out['bytes_per_gpu'] / 1e9:.2f} GB read per step per GPU)")
    prompt = torch.randint(0, cfg.vocab_size, (1, a.prompt_len), generator=torch.Generator().manual_seed(0)).to(device)
    for mode in a.modes:
        t1 = time.perf_counter()
        try:
            engine = DecodeEngine(model, batch=1, max_seq_len=a.prompt_len + a.new_tokens + 8, mode=mode,
                                  regional=mode == "compile")
            engine.capture_error_mode = "thread_local"  # NCCL's watchdog thread polls during the capture
            tok_s = engine.decode_tok_s(prompt, n=a.new_tokens, repeats=a.repeats)
            rates = [None] * world
            dist.all_gather_object(rates, tok_s)
            same = _same_on_all_ranks(engine.tok.tolist())
            out["modes"][mode] = {"tok_s": tok_s, "tok_s_all_ranks": rates, "ms_per_token": 1e3 / tok_s,
                                  "same_tokens_on_all_ranks": same, "seconds": time.perf_counter() - t1}
            _log(rank, f"{a.model} on {world}: {mode} {tok_s:.1f} tok/s ({1e3 / tok_s:.2f} ms/token) "
                       f"in {time.perf_counter() - t1:.0f} s")
            del engine
        except Exception as e:  # one mode failing must not lose the others (both ranks take the same path)
            out["modes"][mode] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
            _log(rank, f"{mode} failed: {type(e).__name__}: {str(e)[:300]}")
            break  # a failed collective leaves the ranks out of step: stop here
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


WORKERS = {"check": _worker_check, "allreduce": _worker_allreduce, "bench": _worker_bench}


# ---- notebook 07's GPU measurements, run from one process -------------------------------------------------
MODELS = ("Qwen2.5-7B", "Llama-3-70B")
# A smoke run's stand-ins (CPU, gloo): the same code paths on tiny shapes; not the architectures' twins.
SMOKE_OVERRIDES = {"num_hidden_layers": 2, "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 4096}


def benchmark(worlds=None, models=MODELS, budget_s: float = 480, smoke: bool = False, compile_models=("Qwen2.5-7B",),
              new_tokens: int = 128, stream: bool = True) -> dict:
    """Notebook 07's measurements, each in its own torchrun launch, most important first, within
    ``budget_s`` seconds (a run that would start too late is skipped and listed):

    1. ``check`` on the largest world: a seeded random SmolLM2-shaped model (4 layers) sharded
       (NCCL, fp32, the decode step in a CUDA graph) against the whole model: a canary for the
       collectives inside a captured graph (if it fails, the benchmarks run eagerly);
    2. ``allreduce`` on each world > 1: one hidden vector (bf16) and one logits slice, alone;
    3. ``bench`` of each model on each world where its shards fit: batch-1 tok/s in CUDA graphs,
       then, in a second pass, with compiled layers for ``compile_models``.

    ``smoke``: on the CPU with gloo, eager, tiny stand-ins of the models (SMOKE_OVERRIDES).
    Returns {"device_count", "runs": [...], "skipped": [...], "summary": {...}}."""
    t_end = time.perf_counter() + budget_s
    gpus = torch.cuda.device_count()
    if worlds is None:
        worlds = [w for w in (1, 2, 4, 8) if w <= max(gpus, 1 if not smoke else 2)]
    runs, skipped = [], []

    def run(command, world, *args, need_s=60, cap_s=300):
        left = t_end - time.perf_counter()
        label = f"{command} {' '.join(map(str, args))} on {world}"
        if left < need_s:
            skipped.append(f"{label}: {left:.0f} s left of the budget, needs ~{need_s} s")
            print(f"skip {label} ({left:.0f} s left)", flush=True)
            return None
        print(f"--- {label} ---", flush=True)
        try:
            r = launch(command, world, *args, timeout_s=min(cap_s, left), stream=stream, prefix="  ")
        except RuntimeError as e:
            r = {"error": str(e)[-2000:]}
            print(f"  failed: {str(e)[:600]}", flush=True)
        r.update(command=command, world=world, args=list(map(str, args)))
        runs.append(r)
        return r

    modes_ok = ["eager"] if smoke else ["graph"]
    top = max(worlds)
    if top > 1:
        chk = run("check", top, "--mode", modes_ok[0], "--new-tokens", 8, "--twin", "SmolLM2-135M", "--fuse",
                  need_s=20, cap_s=180)
        if chk is not None and not smoke and ("error" in chk or not chk.get("tokens_match")):
            print("the CUDA-graph canary failed: the benchmarks run eagerly", flush=True)
            modes_ok = ["eager"]
    dims = ",".join(str(twin_config(m).hidden_size) for m in models)
    vocabs = ",".join(str(twin_config(m).vocab_size) for m in models)
    for w in worlds:
        if w > 1:
            run("allreduce", w, "--dims", dims, "--vocabs", vocabs, need_s=20, cap_s=120)
    mem = torch.cuda.get_device_properties(0).total_memory if gpus else None
    fits = []
    for m in models:
        cfg = twin_config(m, **(SMOKE_OVERRIDES if smoke else {}))
        for w in worlds:
            if mem is not None and bytes_per_gpu(cfg, w) + cfg.vocab_size * cfg.hidden_size * 2 > 0.9 * mem:
                skipped.append(f"{m} on {w} GPU(s): {bytes_per_gpu(cfg, w) / 1e9:.0f} GB of bf16 weights per GPU "
                               f"do not fit in {mem / 1e9:.0f} GB (predicted only)")
            else:
                fits.append((m, w))
    # every model in CUDA graphs first, then the compiled layers (a compile takes 0.5-2 min)
    passes = [(m, w, modes_ok) for m, w in fits]
    if modes_ok == ["graph"]:
        passes += [(m, w, ["compile"]) for m, w in fits if m in compile_models]
    for m, w, modes in passes:
        args = ["--model", m, "--modes", ",".join(modes), "--new-tokens", new_tokens if not smoke else 8]
        if smoke:
            args += ["--overrides", json.dumps(SMOKE_OVERRIDES), "--repeats", 1, "--prompt-len", 4]
        run("bench", w, *args, need_s=150 if "compile" in modes else 60, cap_s=300)
    record = {"device_count": gpus, "worlds": worlds, "smoke": smoke, "runs": runs, "skipped": skipped}
    record["summary"] = summarize(record, models, smoke)
    return record


def summarize(record: dict, models=MODELS, smoke: bool = False) -> dict:
    """Measured against predicted for each model and world: the prediction from the copy bandwidth
    (the 1-GPU bench's rank 0) and the all-reduce / all-gather latencies measured alone (in a CUDA
    graph on GPUs); scaling efficiency tok/s(W) / (W tok/s(1)), against the predicted 1-GPU rate
    where one GPU cannot hold the model."""
    runs = [r for r in record["runs"] if "error" not in r]
    benches = [r for r in runs if r["command"] == "bench"]
    bws = [r["copy_gbps"] for r in benches if r["world"] == 1] or [r["copy_gbps"] for r in benches]
    copy_gbps = bws[0] if bws else None
    lat = {}
    for r in runs:
        if r["command"] == "allreduce":
            for row in r["rows"]:
                key = "graph_us" if "graph_us" in row["allreduce"] else "eager_us"
                lat[(r["world"], row["d"])] = (row["allreduce"][key], row["allgather"][key], key)
    out = {"copy_gbps": copy_gbps, "allreduce": {f"{w} ranks, d={d}": {"allreduce_us": v[0], "allgather_us": v[1],
                                                                        "timed": v[2]} for (w, d), v in lat.items()},
           "models": {}}
    for m in models:
        cfg = twin_config(m, **(SMOKE_OVERRIDES if smoke else {}))
        rows = {}
        for w in sorted(set(record["worlds"]) | {1}):
            row = {"bytes_per_gpu": bytes_per_gpu(cfg, w), **collectives_per_token(cfg, w)}
            if copy_gbps and (w == 1 or (w, cfg.hidden_size) in lat):
                ar, ag = lat.get((w, cfg.hidden_size), (0.0, 0.0, None))[:2]
                p = predicted_ms(cfg, w, copy_gbps, ar, ag)
                row.update(predicted_ms=p["ms"], predicted_read_ms=p["read_ms"], predicted_comm_ms=p["comm_ms"],
                           predicted_tok_s=p["tok_s"])
            modes = {mode: res for r in benches if r["model"] == m and r["world"] == w for mode, res in r["modes"].items()}
            if modes:
                for mode, res in modes.items():
                    if "tok_s" in res:
                        row[f"{mode}_tok_s"] = res["tok_s"]
                measured = [res["tok_s"] for res in modes.values() if "tok_s" in res]
                if measured:
                    row["tok_s"] = max(measured)
                    row["ms"] = 1e3 / row["tok_s"]
                    if "predicted_ms" in row:
                        row["measured_over_predicted_ms"] = row["ms"] / row["predicted_ms"]
                    if copy_gbps:
                        row["fraction_of_bytes_bound"] = (row["bytes_per_gpu"] / (copy_gbps * 1e9) * 1e3) / row["ms"]
            rows[w] = row
        one = rows.get(1, {})
        base, basis = (one["tok_s"], "measured") if "tok_s" in one else (one.get("predicted_tok_s"), "predicted")
        for w, row in rows.items():
            if "tok_s" in row and base:
                row["speedup_vs_1"] = row["tok_s"] / base
                row["scaling_efficiency"] = row["tok_s"] / (w * base)
                row["one_gpu_basis"] = basis
        out["models"][m] = {str(w): row for w, row in rows.items()}
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m labutils.tp", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name in WORKERS:
        s = sub.add_parser(name)
        s.add_argument("--world", type=int, default=2, help="processes (GPUs) to launch when run by hand")
        s.add_argument("--backend", choices=["nccl", "gloo"], default=None, help="default: nccl with GPUs, else gloo")
        s.add_argument("--out", default=None, help="(set by the launcher) where rank 0 writes its JSON")
        s.add_argument("--timeout", type=float, default=600)
        if name == "check":
            s.add_argument("--prompt-ids", type=lambda s: tuple(int(t) for t in s.split(",")), default=DEFAULT_PROMPT)
            s.add_argument("--new-tokens", type=int, default=6)
            s.add_argument("--dtype", default="float32")
            s.add_argument("--mode", default="eager", choices=["eager", "graph", "compile"])
            s.add_argument("--fuse", action="store_true", help="fuse_projections on each shard")
            s.add_argument("--save", default=None, help="rank 0 saves its logits and tokens here (torch.save)")
            s.add_argument("--twin", default="", help="a seeded random model of this architecture instead of the embedded one")
            s.add_argument("--layers", type=int, default=4, help="layers of the --twin model")
            s.add_argument("--seed", type=int, default=0)
        if name == "allreduce":
            s.add_argument("--dims", type=lambda s: [int(t) for t in s.split(",")], default=[3584, 8192])
            s.add_argument("--vocabs", type=lambda s: [int(t) for t in s.split(",")], default=[152064, 128256])
            s.add_argument("--dtype", default="bfloat16")
        if name == "bench":
            s.add_argument("--model", default="Qwen2.5-7B")
            s.add_argument("--overrides", default="", help="JSON of config fields (smoke runs: a smaller stand-in)")
            s.add_argument("--modes", type=lambda s: s.split(","), default=["graph"])
            s.add_argument("--new-tokens", type=int, default=128)
            s.add_argument("--prompt-len", type=int, default=16)
            s.add_argument("--repeats", type=int, default=3)
            s.add_argument("--seed", type=int, default=0)
            s.add_argument("--dtype", default="bfloat16")
    return p


def main(argv=None):
    a = _parser().parse_args(argv)
    if "RANK" not in os.environ:  # run by hand: launch the ranks, print rank 0's result
        argv = list(sys.argv[1:] if argv is None else argv)
        rest, skip = [], False
        for x in argv[1:]:  # everything but --world N goes to the ranks
            if skip or x == "--world" or x.startswith("--world="):
                skip = x == "--world"
                continue
            rest.append(x)
        result = launch(a.command, a.world, *rest, timeout_s=a.timeout, stream=True)
        print(json.dumps(result, indent=1))
        return
    rank, world, group, device = init_distributed(a.backend)
    a.backend_name = "nccl" if device.type == "cuda" else "gloo"
    try:
        result = WORKERS[a.command](a, rank, world, group, device)
        result["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        if rank == 0 and a.out:
            Path(a.out).write_text(json.dumps(result, indent=1))
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
