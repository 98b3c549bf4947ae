"""Per-input-channel scales for the 4-bit formats, chosen on calibration activations (notebook 04).

Activation-aware scaling (AWQ-style, simplified): a few input channels carry large activations, and
errors in the weights they multiply cost the most. Scaling column k of W up by s_k (and x_k down by
s_k, the per-channel ``in_scale`` multiply inside the W4A16 kernel) gives those weights a finer
grid after quantization. ``awq_scales`` picks s = act_mean ** alpha per linear, alpha on a grid in
[0, 1) that minimises the output error on calibration activations; alpha = 0 is round-to-nearest.

The quantized modules of labutils.quant apply the scales (``in_scale``) inside the W4A16 kernel.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .quant_formats import _check, quantize_int4, quantize_nf4


def _act_scaled(W: torch.Tensor, act_scale: torch.Tensor | None, dtype):
    """AWQ: (W diag(s), in_scale) with in_scale = 1/s stored in ``dtype`` and s taken back from it, so
    that (W diag(s)) (x * in_scale) == W x up to rounding of the product only."""
    if act_scale is None:
        return W, None
    in_scale = (1.0 / act_scale.float()).to(dtype)  # (K,)
    return W.float() / in_scale.float()[None, :], in_scale


def _swappable(model: nn.Module) -> dict:
    """name -> nn.Linear that the seam would hand over: all but one tied to an embedding table."""
    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and id(m.weight) not in tied}


def _quantizer(fmt: str, kw: dict):
    if fmt == "int4":
        return lambda W: quantize_int4(W, **kw)
    if fmt == "nf4":
        return lambda W: quantize_nf4(W, **kw)
    raise ValueError(f"activation-aware scaling covers the 4-bit formats 'int4' and 'nf4', not {fmt!r}")


@torch.no_grad()
def awq_search(W: torch.Tensor, X: torch.Tensor, act_mean: torch.Tensor, fmt: str = "int4", n_grid: int = 20,
               scale_dtype=torch.float16, **kw):
    """Best per-input-channel scale for one linear W (N, K) on calibration inputs X (rows, K).

    Tries s = act_mean ** alpha for alpha in 0, 1/n_grid, .., (n_grid - 1)/n_grid (normalised so that
    max(s) min(s) = 1), quantizes W diag(s), and keeps the s with the smallest mean squared output
    error ||X W_eff^T - X W^T||^2 / numel, W_eff = deq(Q(W diag(s))) diag(1/s) as the module applies
    it. alpha = 0 is plain round-to-nearest, so the result is never worse than it on X.
    Returns (s (K,), info) with info = {'alpha', 'err_rtn', 'err'}.
    """
    quantize = _quantizer(fmt, dict(kw, scale_dtype=scale_dtype))
    _check(W)
    K = W.shape[1]
    if X.dim() != 2 or X.shape[1] != K or not X.is_floating_point():
        raise ValueError(f"awq_search: X must be floating calibration inputs (rows, {K}), got {X.dtype} of "
                         f"shape {tuple(X.shape)}")
    if tuple(act_mean.shape) != (K,):
        raise ValueError(f"awq_search: act_mean must have shape ({K},) (mean |x| per input channel), got "
                         f"{tuple(act_mean.shape)}")
    if not isinstance(n_grid, int) or n_grid < 1:
        raise ValueError(f"awq_search: n_grid must be a positive int, got {n_grid!r}")
    W, X = W.detach().float(), X.float()
    Y = X @ W.T  # (rows, N)
    a = act_mean.float().clamp_min(1e-4)
    best = None
    for i in range(n_grid):
        alpha = i / n_grid
        s = a.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        Ws, in_scale = _act_scaled(W, s, scale_dtype)
        W_eff = quantize(Ws).dequantize() * in_scale.float()[None, :]
        err = (X @ W_eff.T - Y).pow(2).mean().item()
        if i == 0:
            err_rtn = err
        if best is None or err < best[0]:
            best = (err, alpha, 1.0 / in_scale.float())
    return best[2], {"alpha": best[1], "err_rtn": err_rtn, "err": best[0]}


@torch.no_grad()
def awq_scales(model, calib_ids: torch.Tensor, fmt: str = "int4", *, n_grid: int = 20, max_rows: int = 512,
               return_info: bool = False, progress: bool = True, seed: int = 0, **kw):
    """AWQ-style scales for every linear the seam would quantize, from calibration token ids.

    calib_ids (B, T): calibration text (never the evaluation text), run one sequence at a time.
    Hooks record each linear's inputs: the mean |x| per input channel over all tokens, and up to
    ``max_rows`` token rows (a seeded random subset) on which awq_search measures the output error.
    kw: ``group_size`` / ``block_size``, ``scale_dtype``, as for quantize_model. Returns name -> s (K,)
    for ``quantize_model(model, fmt, awq=...)``, and with ``return_info`` also name -> awq_search info.
    Simplifications against AWQ: each linear gets its own s (applied inside the kernel, nothing is
    folded into the previous layer), no weight-clipping search, activations from the unquantized model.
    """
    from tqdm.auto import tqdm

    calib_ids = calib_ids.reshape(-1, calib_ids.shape[-1]) if calib_ids.dim() > 1 else calib_ids[None]
    B, T = calib_ids.shape
    per_seq = -(-max_rows // B)
    gen = torch.Generator().manual_seed(seed)
    linears = _swappable(model)
    stats = {name: {"sum": 0.0, "n": 0, "rows": []} for name in linears}

    def hook(name):
        def fn(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # (tokens, K)
            st = stats[name]
            st["sum"] = st["sum"] + x.abs().sum(0)
            st["n"] += x.shape[0]
            st["rows"].append(x[torch.randperm(x.shape[0], generator=gen)[:per_seq].to(x.device)])
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    try:
        dev = next(model.parameters()).device
        for b in range(B):
            model(calib_ids[b : b + 1].to(dev))
    finally:
        for h in handles:
            h.remove()
    scales, info = {}, {}
    for name in tqdm(linears, desc="AWQ search", disable=not progress):
        st = stats[name]
        X = torch.cat(st["rows"])[:max_rows]
        scales[name], info[name] = awq_search(linears[name].weight, X, st["sum"] / st["n"], fmt, n_grid, **kw)
    return (scales, info) if return_info else scales
