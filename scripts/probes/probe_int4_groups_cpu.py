"""INT4 perplexity by group size on the embedded model (CPU, fp32; not a GPU probe), for notebook 04's
quality-by-group-size cell: round to nearest with labutils' asymmetric INT4 (an integer zero point
per group) at groups of 32, 64 and 128, and a Q4_1-style quantizer at groups of 32 (a float scale d
and a float minimum m per group: w = d * q + m, the format the embedded model was shipped in), on
the first 16,384 tokens of data/'s held-out eval text, as notebook 04 scores. The unquantized
baseline is the dequantized Q4_1 model itself, so the Q4_1-style quantizer should find its grid
again: how close it comes, and how far the integer zero point and larger groups are from it.
`probe_int4_groups_cpu.py 16384 offset`: labutils' INT4 with a float offset per group instead
(quantize_int4(offset=True), fp16 scale and offset as stored) at groups of 32, 64 and 128."""
import json
import os
import sys
import time

import torch

from labutils import quant
from labutils.data import load_text
from labutils.decoder import Decoder
from labutils.models import load_model
from labutils.perplexity import perplexity

torch.set_grad_enabled(False)
torch.set_num_threads(2)
MAX_TOKENS = int(sys.argv[1]) if len(sys.argv) > 1 else 16384
hf, tok = load_model(dtype=torch.float32, device="cpu")
text = load_text("eval")


def q4_1_style(w: torch.Tensor, g: int = 32) -> torch.Tensor:
    """w (N, K) through Q4_1's grid per group of g along K: d = (max - min) / 15, m = min, q = round((w - m) / d)."""
    N, K = w.shape
    wg = w.reshape(N, K // g, g)
    lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    d = ((hi - lo) / 15).clamp_min(1e-12)
    q = ((wg - lo) / d).round().clamp(0, 15)
    return (q * d + lo).reshape(N, K)


def q4_1_model():
    m = Decoder.from_hf(hf)

    def swap(name, lin):
        new = torch.nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None)
        new.weight = torch.nn.Parameter(q4_1_style(lin.weight.float()), requires_grad=False)
        new.bias = lin.bias
        return new

    return m.swap_linears(swap)


OFFSET = len(sys.argv) > 2 and sys.argv[2] == "offset"  # labutils' float-offset INT4 (fp16 scale and offset)
candidates = {"unquantized (the dequantized Q4_1 model)": lambda: Decoder.from_hf(hf)}
if not OFFSET:
    candidates["Q4_1-style g32 (float scale and minimum)"] = q4_1_model
for g in (32, 64, 128):
    if OFFSET:
        candidates[f"int4 g{g} (float offset, fp16)"] = lambda g=g: quant.quantize_model(
            Decoder.from_hf(hf), "int4", simulate=True, group_size=g, offset=True)
    else:
        candidates[f"int4 g{g} (integer zero point)"] = lambda g=g: quant.quantize_model(
            Decoder.from_hf(hf), "int4", simulate=True, group_size=g, scale_dtype=torch.float32)
out = {"what": __doc__.split("\n")[0], "max_tokens": MAX_TOKENS, "torch": torch.__version__, "ppl": {}, "seconds": {}}
for name, make in candidates.items():
    t0 = time.perf_counter()
    out["ppl"][name] = perplexity(make(), tok, text, max_tokens=MAX_TOKENS, progress=False)
    out["seconds"][name] = time.perf_counter() - t0
    print(f"{name}: ppl {out['ppl'][name]:.3f} ({out['seconds'][name]:.0f} s)", flush=True)
base = out["ppl"]["unquantized (the dequantized Q4_1 model)"]
out["vs_unquantized"] = {k: v / base - 1 for k, v in out["ppl"].items()}
path = os.path.join(os.path.dirname(__file__), "results",
                    "probe_int4_groups_offset_cpu.json" if OFFSET else "probe_int4_groups_cpu.json")
json.dump(out, open(path, "w"), indent=1)
print(json.dumps(out["vs_unquantized"], indent=1))
