"""Fine-tuning training speed: today's recipe vs the alternatives, side by side in one process.

Run: PYTHONPATH=. .venv/bin/python bench/finetune_speed.py [--data /work/cache/fmnist/train]
         [--input-size 96] [--batch-size 64] [--unfreeze all] [--steps 10] [--rounds 3]
         [--variants baseline,cache,cache+cl,cache+bf16,cache+cl+bf16]

One network (the card, pretrained, LP head left at random: speed does not depend
on it), one optimiser, the same training images for every variant. The variants
take turns, round after round, each timing ``--steps`` training steps after one
untimed step, so a change in the machine's load hits them all alike; the ratio of
each variant to ``baseline`` is computed per round and the median of the rounds
is reported with the absolute images/s (which drift with the load).

- ``baseline``: today's recipe: fp32, contiguous weights, every image decoded
  from its file at every step (``ImageDataset`` without a cache).
- ``cache``: decoded images kept in memory (featx.finetune.data.DECODED_CACHE_BYTES),
  as ``featx finetune`` now does with in-process loading.
- ``cl``: channels_last weights (the NHWC input permuted to NCHW already is
  channels_last in memory).
- ``bf16``: bf16 autocast on CPU (only worth it where the CPU has AVX-512 BF16 or
  AMX: ``grep -o 'avx512_bf16\\|amx_bf16' /proc/cpuinfo``).
- ``uK``: only the top K card blocks train (``--unfreeze K``); the frozen early blocks,
  the widest activations, run forward only.
- ``compile``: ``torch.compile`` of the network; its compile time is reported apart
  (a run must amortise it).

Each variant starts from the same weights (restored before its turn), so no
variant trains a network the others do not.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import time
from pathlib import Path


def cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return sorted({f for f in line.split() if "bf16" in f or f.startswith("amx") or f == "avx512_vnni"})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="/work/cache/fmnist/train")
    ap.add_argument("--input-size", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--unfreeze", default="all")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", default="baseline,cache,cache+cl,cache+bf16")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    a = ap.parse_args()

    import numpy as np
    import torch

    from featx.backbones.export import make_wrapper
    from featx.backbones.zoo import build
    from featx.finetune import loop as tl
    from featx.finetune.config import FinetuneConfig, card_for
    from featx.finetune.data import DECODED_CACHE_BYTES, ImageDataset, collate, labelled_files

    unfreeze = a.unfreeze if a.unfreeze == "all" else int(a.unfreeze)
    cfg = FinetuneConfig(input_size=a.input_size, unfreeze=unfreeze)
    card = card_for(cfg)
    files = labelled_files(a.data)
    n_img = a.batch_size * (a.steps + 1)
    rng = np.random.default_rng(0)
    files = files.subset(np.sort(rng.choice(len(files), min(n_img, len(files)), replace=False)))
    bb, _, _ = build(card, None, pretrained=True)
    net = tl.FineTuneNet(make_wrapper(bb, card.preprocess), card.dim, len(files.classes))
    tl.set_trainable(net, card, tl.resolve_unfreeze(card, unfreeze))
    start = copy.deepcopy(net.state_dict())
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    variants = a.variants.split(",")
    datasets = {v: ImageDataset(files, card.preprocess, train=True, seed=0,
                                cache_bytes=DECODED_CACHE_BYTES if "cache" in v else 0) for v in variants}
    for v in variants:  # the cached variants' first (filling) pass is not what later epochs cost
        if "cache" in v:
            [datasets[v][i] for i in range(len(files))]

    base_k = tl.resolve_unfreeze(card, unfreeze)
    compiled: dict[str, object] = {}

    def model_for(v: str):
        parts = v.split("+")
        k = next((int(t[1:]) for t in parts if t[:1] == "u" and t[1:].isdigit()), None)
        tl.set_trainable(net, card, k if k is not None else base_k)
        if "compile" not in parts:
            return net
        if v not in compiled:
            compiled[v] = torch.compile(net)
        return compiled[v]

    def steps(v: str, n: int) -> float:
        """Seconds for ``n`` training steps of variant ``v`` (batches read through its dataset)."""
        ds = datasets[v]
        net.to(memory_format=torch.channels_last if "cl" in v.split("+") else torch.contiguous_format)
        model = model_for(v)
        opt = torch.optim.AdamW(tl.param_groups(net, 1e-3, 1e-4, 0.05))
        ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if "bf16" in v else contextlib.nullcontext
        tl.train_mode(net)
        t0 = time.perf_counter()
        for s in range(n):
            x, y = collate([ds[i] for i in range(s * a.batch_size, (s + 1) * a.batch_size)])
            with ctx():
                loss = loss_fn(model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return time.perf_counter() - t0

    rates: dict[str, list[float]] = {v: [] for v in variants}
    ratios: dict[str, list[float]] = {v: [] for v in variants}
    print(f"{card.name} at {a.input_size} px, batch {a.batch_size}, unfreeze {unfreeze}, {a.steps} steps a turn, "
          f"{a.rounds} rounds; torch {torch.__version__}, {torch.get_num_threads()} threads; CPU flags "
          f"{' '.join(cpu_flags()) or '(no bf16/amx/vnni)'}", flush=True)
    for r in range(a.rounds):
        for v in variants:
            net.load_state_dict(start)
            t_first = time.perf_counter()
            steps(v, 1)  # untimed: first-call costs (oneDNN primitives, allocations, compiling)
            if r == 0 and "compile" in v:
                print(f"  {v}: first step (compile) {time.perf_counter() - t_first:.1f} s", flush=True)
            net.load_state_dict(start)
            secs = steps(v, a.steps)
            rates[v].append(a.steps * a.batch_size / secs)
            print(f"round {r + 1} {v:>16}: {rates[v][-1]:7.1f} img/s", flush=True)
        for v in variants:
            ratios[v].append(rates[v][-1] / rates["baseline"][-1] if "baseline" in rates else float("nan"))
    print("\nvariant           median img/s   median ratio to baseline (per-round ratios)")
    out = {}
    for v in variants:
        out[v] = {"images_per_second": rates[v], "ratio": ratios[v]}
        print(f"{v:>16}   {statistics.median(rates[v]):8.1f}       {statistics.median(ratios[v]):.2f}x "
              f"({', '.join(f'{x:.2f}' for x in ratios[v])})")
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
