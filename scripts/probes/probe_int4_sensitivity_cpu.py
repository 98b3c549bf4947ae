"""Where INT4's perplexity loss comes from on the embedded model (CPU, fp32; not a GPU probe).

Quantizes one kind of linear layer at a time (group-128 round-to-nearest INT4, through dequantized
weights), then one decoder layer at a time, and prints each perplexity against the unquantized model.

    PYTHONPATH=$PWD python scripts/probes/probe_int4_sensitivity_cpu.py 4096   # eval tokens

Measured 2026-11-30 (first 4,096 eval tokens, unquantized 26.12; all layers INT4: +29.5%):
q_proj alone +1.8%, k_proj +1.3%, v_proj +2.1%, o_proj +1.6%, gate_proj +4.0%, up_proj +6.6%
(down_proj and the per-layer pass did not run before the time ran out). No kind of layer dominates:
the parts add up to about the whole, so keeping one kind in INT8 would not bring INT4 near +5%.
"""
import sys, time, torch
from labutils import quant as Q
from labutils.data import load_text
from labutils.decoder import Decoder
from labutils.models import load_model
from labutils.perplexity import perplexity
torch.set_num_threads(2)
hf, tok = load_model()
text = load_text("eval")
N = int(sys.argv[1])
ppl = lambda m: perplexity(m, tok, text, max_tokens=N, progress=False)
t=time.time(); base = ppl(Decoder.from_hf(hf)); print(f"base {base:.3f} ({time.time()-t:.0f}s)", flush=True)
def only(pred):
    m = Decoder.from_hf(hf)
    def make(name, lin):
        if not pred(name): return lin
        q = Q.Int4Linear.from_linear(lin)
        sim = torch.nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None)
        sim.weight = torch.nn.Parameter(q.dequantize(lin.weight.dtype), requires_grad=False); sim.bias = lin.bias
        return sim
    return ppl(m.swap_linears(make)) / base - 1
print(f"all {only(lambda n: True):+.1%}", flush=True)
names = list(Q._swappable(Decoder.from_hf(hf)))
print(names[:8], len(names))
for typ in ["q_proj","k_proj","v_proj","o_proj","gate_proj","up_proj","down_proj"]:
    print(f"only {typ} {only(lambda n: n.endswith(typ)):+.1%}", flush=True)
nl = hf.config.num_hidden_layers
for i in range(nl):
    print(f"only layer {i} {only(lambda n: f'.{i}.' in n or n.startswith(f'{i}.') or f'layers.{i}.' in n):+.2%}", flush=True)
