"""How fast do TP and one process drift apart in training, and is it TP or float32 rounding?
A one-off check behind the README's "The first command against one process" (not part of the
package or the tests). Run, with the tiny preset's data cache built (any `resstream train
--config configs/tiny.toml` run builds it; its folder is printed as "data: ..."):
    OMP_NUM_THREADS=1 .venv/bin/torchrun --nproc_per_node=2 docs/ladder/tp_drift.py CACHE_DIR/train.bin [STEPS]
Tiny preset's model (d128, 4 layers, 4 heads, vocab 4096), real KJV batches (16 x 128),
AdamW lr 3e-3 constant (betas 0.9/0.95, wd 0.1 on every tensor), clip 1.0, 20 steps, ladder.
Columns: relative loss difference per step for
  f32 TP vs 1p | f64 TP vs 1p | control: f32 1p vs 1p whose weights were perturbed by 1e-7 (relative), no TP."""
import copy, os, sys
import numpy as np, torch, torch.distributed as dist
from resstream import LM
from resstream.model.config import ModelConfig
from resstream.residual.config import ResidualConfig
from resstream.parallel.tensor import make_mesh, parallelize, clip_grad_norm

torch.set_num_threads(1)
dist.init_process_group("gloo")
rank = dist.get_rank()
mesh = make_mesh("cpu", 2)["tp"]
data = torch.from_numpy(np.fromfile(sys.argv[1], dtype=np.uint16).astype(np.int64))
STEPS = int(sys.argv[2]) if len(sys.argv) > 2 else 20
g = torch.Generator().manual_seed(0)
batches = []
for _ in range(STEPS):
    s = torch.randint(0, len(data) - 129, (16,), generator=g)
    w = torch.stack([data[i:i + 129] for i in s])
    batches.append((w[:, :-1], w[:, 1:]))

def cfg():
    return ModelConfig(vocab_size=4096, d_model=128, n_layers=4, n_heads=4, max_seq_len=256, residual=ResidualConfig(kind="ladder"))

def opt(m):
    return torch.optim.AdamW(m.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)

def run(model, tp):
    o, losses = opt(model), []
    for idx, tgt in batches:
        _, loss = model(idx, tgt)
        loss.backward()
        (clip_grad_norm(model.parameters(), 1.0) if tp else torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        o.step(); o.zero_grad()
        losses.append(loss.item())
    return losses

res = {}
for dtype in (torch.float32, torch.float64):
    torch.manual_seed(0)
    base = LM(cfg()).to(dtype)
    ref = copy.deepcopy(base)
    res[f"tp_{dtype}"] = run(parallelize(base, mesh), True)
    if rank == 0:
        res[f"1p_{dtype}"] = run(ref, False)
if rank == 0:
    torch.manual_seed(0)
    pert = LM(cfg())
    gp = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in pert.parameters():
            p.mul_(1 + 1e-7 * torch.randn(p.shape, generator=gp))
    res["pert"] = run(pert, False)
    f32, f64 = torch.float32, torch.float64
    print("step  loss(1p f32)  |rel| f32 TP vs 1p  |rel| f64 TP vs 1p  |rel| f32 1p vs 1p perturbed 1e-7 (no TP)")
    for i in range(STEPS):
        a = res[f"1p_{f32}"][i]
        print(f"{i + 1:4d}  {a:.6f}  {abs(res[f'tp_{f32}'][i] - a) / a:.2e}  {abs(res[f'tp_{f64}'][i] - res[f'1p_{f64}'][i]) / res[f'1p_{f64}'][i]:.2e}  {abs(res['pert'][i] - a) / a:.2e}")
dist.destroy_process_group()
