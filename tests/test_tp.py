"""Tensor parallelism (labutils.tp): the plan, the weight shards, the byte count, and 2 and 4 gloo
processes against the single-process decoder on the embedded model (logits and greedy tokens)."""
from __future__ import annotations

import pytest
import torch

from conftest import assert_rel_close, tiny_hf_model
from labutils import tp
from labutils.decoder import Decoder, DecoderConfig
from labutils.engine import DecodeEngine
from labutils.generate import encode_prompt

# fp32, the same tolerance as the decoder against HF transformers (tests/test_decoder.py): a row-parallel
# product sums its partial products in another order (per rank, then across ranks); measured ~2e-6.
TOL = 1e-5
N_NEW = 6


def _cfg(n_head, n_kv_head, head_dim=8, d=32, ffn=48, vocab=50, **kw):
    return DecoderConfig(vocab_size=vocab, hidden_size=d, intermediate_size=ffn, n_layer=2, n_head=n_head,
                         n_kv_head=n_kv_head, head_dim=head_dim, rope_theta=1e4, rms_norm_eps=1e-6,
                         qkv_bias=False, tie_embeddings=False, max_seq_len=64, **kw)


# ---- the plan -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_head,n_kv_head,world", [(9, 3, 2), (9, 3, 4), (28, 4, 2), (28, 4, 8), (64, 8, 2),
                                                    (32, 32, 4), (14, 2, 4), (4, 1, 3), (6, 6, 6), (8, 2, 1)])
def test_plan_covers_each_head_once_and_keeps_its_kv_head(n_head, n_kv_head, world):
    cfg = _cfg(n_head, n_kv_head, ffn=47, vocab=53)
    shards = tp.plan(cfg, world)
    group = n_head // n_kv_head
    assert [s.heads for s in shards] == [tp.split_range(n_head, world, r) for r in range(world)]
    assert shards[0].heads[0] == 0 and shards[-1].heads[1] == n_head
    assert all(a.heads[1] == b.heads[0] for a, b in zip(shards, shards[1:])), "heads not contiguous"
    assert max(s.n_head for s in shards) - min(s.n_head for s in shards) <= 1, "unbalanced"
    for s in shards:
        assert s.n_head % s.n_kv_head == 0, f"rank {s.rank}: {s.n_head} heads over {s.n_kv_head} KV heads"
        g = s.n_head // s.n_kv_head  # the attention contract on the rank: local head i reads local KV head i // g
        for i in range(s.n_head):
            assert s.kv_heads[i // g] == (s.heads[0] + i) // group, \
                f"rank {s.rank}: query head {s.heads[0] + i} would read KV head {s.kv_heads[i // g]}"
    for field, n in (("ffn", 47), ("vocab", 53)):
        ranges = [getattr(s, field) for s in shards]
        assert ranges[0][0] == 0 and ranges[-1][1] == n and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert all(s.vocab_per_rank * world >= 53 and s.vocab_per_rank >= s.vocab[1] - s.vocab[0] for s in shards)


def test_plan_replicates_kv_heads_and_refuses_ranks_without_a_head():
    shards = tp.plan(_cfg(8, 2), 4)  # 2 KV heads, 4 ranks: each KV head held by two ranks
    assert [s.kv_heads for s in shards] == [(0,), (0,), (1,), (1,)]
    with pytest.raises(ValueError, match="at most 9 ranks"):
        tp.plan(_cfg(9, 3), 10)
    with pytest.raises(ValueError, match="integer >= 1"):
        tp.plan(_cfg(9, 3), 0)


# ---- the shards -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    """A tiny decoder with q/k/v and o biases (4 heads, 2 KV heads)."""
    return Decoder.from_hf(tiny_hf_model("llama-gqa-attn-bias"))


@pytest.mark.parametrize("world", [2, 3])
def test_shards_reassemble_the_full_weights(tiny, world):
    cfg, full = tiny.cfg, tiny.state_dict()
    shards = tp.plan(cfg, world)
    parts = {name: [tp.shard_tensor(name, t, cfg, s) for s in shards] for name, t in full.items()}
    a = "layers.1.self_attn."
    assert torch.equal(torch.cat(parts[a + "q_proj.weight"]), full[a + "q_proj.weight"])  # columns of the output
    assert torch.equal(torch.cat(parts[a + "q_proj.bias"]), full[a + "q_proj.bias"])
    assert torch.equal(torch.cat(parts[a + "o_proj.weight"], dim=1), full[a + "o_proj.weight"])  # rows of the input
    assert all(torch.equal(p, full[a + "o_proj.bias"]) for p in parts[a + "o_proj.bias"]), "o bias must stay whole"
    m = "layers.0.mlp."
    assert torch.equal(torch.cat(parts[m + "gate_proj.weight"]), full[m + "gate_proj.weight"])
    assert torch.equal(torch.cat(parts[m + "down_proj.weight"], dim=1), full[m + "down_proj.weight"])
    assert torch.equal(torch.cat(parts["lm_head.weight"])[:cfg.vocab_size], full["lm_head.weight"])
    hd = cfg.head_dim
    for s, k in zip(shards, parts[a + "k_proj.weight"]):
        want = torch.cat([full[a + "k_proj.weight"][h * hd:(h + 1) * hd] for h in s.kv_heads])
        assert torch.equal(k, want), f"rank {s.rank}: k_proj rows are not those of KV heads {s.kv_heads}"


def test_world_one_shard_is_the_model(tiny):
    ids = torch.randint(0, tiny.cfg.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    local = tp.shard_decoder(tiny, 0, 1)
    assert_rel_close(local(ids), tiny(ids), 0.0, "one rank: nothing split")
    assert isinstance(local.layers[0].mlp.down_proj, tp.RowParallelLinear)
    with pytest.raises(ValueError, match="before fuse_projections"):
        tp.shard_decoder(Decoder.from_hf(tiny_hf_model("llama-gqa-tied")).fuse_projections(), 0, 2)


def test_a_shard_without_its_group_refuses_to_run(tiny):
    local = tp.shard_decoder(tiny, 1, 2)  # no process group: the partial sums could not be completed
    with pytest.raises(RuntimeError, match="process group"):
        local(torch.zeros(1, 3, dtype=torch.long))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_rank_bytes_count_the_shard_parameters(world):
    """The cost model's bytes equal the parameters each twin shard holds, minus the embedding table
    (a lookup reads one row of it), on an architecture with q/k/v biases (Qwen2)."""
    cfg = tp.twin_config("Qwen2.5-7B", **{**tp.SMOKE_OVERRIDES, "num_attention_heads": 6, "num_key_value_heads": 3})
    for s in tp.plan(cfg, world):
        local = tp.twin_shard(cfg, s.rank, world, dtype=torch.float32, device="cpu")
        n = sum(p.numel() for name, p in local.named_parameters() if name != "embed_tokens.weight")
        assert tp.rank_bytes(cfg, s, 4) == 4 * (n + cfg.hidden_size), f"rank {s.rank} of {world}"
    assert tp.bytes_per_gpu(cfg, world) == max(tp.rank_bytes(cfg, s) for s in tp.plan(cfg, world))


def test_twin_shards_are_seeded_per_rank():
    cfg = tp.twin_config("SmolLM2-135M", **tp.SMOKE_OVERRIDES)
    a, b = (tp.twin_shard(cfg, 0, 2, dtype=torch.float32, device="cpu", seed=3) for _ in range(2))
    other = tp.twin_shard(cfg, 1, 2, dtype=torch.float32, device="cpu", seed=3)
    w = "layers.0.mlp.up_proj.weight"
    assert torch.equal(a.state_dict()[w], b.state_dict()[w]), "same seed and rank, other weights"
    assert not torch.equal(a.state_dict()[w], other.state_dict()[w]), "two ranks drew the same weights"
    assert a.lm_head.weight.shape[0] == -(-cfg.vocab_size // 2)


def test_predicted_time_adds_reading_and_collectives():
    cfg = tp.twin_config("Llama-3-70B")
    p = tp.predicted_ms(cfg, 2, copy_gbps=4000.0, allreduce_us=10.0, allgather_us=20.0)
    assert p["all_reduce"] == 160 and p["all_gather"] == 1
    assert p["read_ms"] == pytest.approx(tp.bytes_per_gpu(cfg, 2) / 4e12 * 1e3)
    assert p["comm_ms"] == pytest.approx((160 * 10 + 20) * 1e-3)
    assert tp.predicted_ms(cfg, 1, 4000.0, 10.0)["comm_ms"] == 0


# ---- processes: gloo against one process, on the embedded model ------------------------------------------
@pytest.fixture(scope="module")
def reference(embedded):
    """The whole decoder's prompt logits and greedy tokens, in this process."""
    hf, tokenizer = embedded
    ids = encode_prompt(tokenizer, "Why is the sky blue? Answer in one sentence.", chat=True)
    model = Decoder.from_hf(hf)
    with torch.no_grad():
        logits = model(ids)
        tokens = DecodeEngine(model, max_seq_len=ids.shape[1] + N_NEW + 1).generate(ids, N_NEW)[0, ids.shape[1]:]
    return ids, logits, tokens.tolist()


@pytest.mark.parametrize("world,fuse", [(2, False), (4, True)])
def test_gloo_ranks_match_the_single_process_decoder(reference, tmp_path, world, fuse):
    """9 query heads over 2 ranks are 5 + 4 (a KV head on both ranks), over 4 ranks 3 + 2 + 2 + 2."""
    ids, ref_logits, ref_tokens = reference
    save = tmp_path / "rank0.pt"
    out = tp.launch("check", world, "--prompt-ids", ",".join(map(str, ids[0].tolist())), "--new-tokens", N_NEW,
                    "--save", save, *(["--fuse"] if fuse else []), timeout_s=240)
    assert out["world"] == world and out["backend"] == "gloo"
    assert out["identical_on_all_ranks"], "the ranks disagree on the logits or the tokens"
    got = torch.load(save)
    assert_rel_close(got["logits"], ref_logits, TOL, f"{world} gloo ranks vs one process, prompt logits")
    assert got["tokens"] == ref_tokens, f"{world} ranks: greedy {got['tokens']} vs one process {ref_tokens}"
    assert out["tokens_match"] and out["logits_rel_err"] <= TOL, "rank 0's own comparison disagrees"
