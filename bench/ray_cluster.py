"""A Ray cluster of several nodes simulated on one machine: what more nodes and more actors cost.

    python bench/ray_cluster.py --images 1000 --layouts 1x2,2x1,4x1,4x5

Each layout ``NxC`` starts a fresh Ray cluster of N nodes with C logical CPUs each on
this machine (``ray.cluster_utils.Cluster``: a raylet and an object store per node,
as ``ray start`` on separate ports would give), runs ``featx extract --engine ray
--address HEAD`` on the folder into a fresh store, and compares its wall time with the
local engine's on the same folder in the same run. The physical cores do not grow with
N: what grows is the cluster's machinery (nodes, actors, object stores, scheduling), so
the ratio over ``1x2`` is what those cost. A layout with more logical CPUs than cores
(``4x5``: 20 actors on 2 cores) is 10x the actor count for the same work: scheduling and
store contention. The embeddings must be bit-identical to the local engine's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def run_layout(folder: Path, bb, nodes: int, cpus: int, store: Path, batch_size: int) -> dict:
    """One cluster of ``nodes`` x ``cpus``: start it, extract through it, stop it."""
    import ray
    from ray.cluster_utils import Cluster

    from featx.extract import extract

    t0 = time.perf_counter()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": cpus})
    for _ in range(nodes - 1):
        cluster.add_node(num_cpus=cpus)
    cluster.wait_for_nodes()
    start = time.perf_counter() - t0
    try:
        # what `featx extract --engine ray --address HOST:PORT` does
        r = extract(folder, bb, store=store, write=False, batch_size=batch_size, device="cpu",
                    engine="ray", address=cluster.address)
        alive = len(cluster.list_all_nodes())
    finally:
        ray.shutdown()
        cluster.shutdown()
    return {"layout": f"{nodes}x{cpus}", "nodes": alive, "actors": nodes * cpus,
            "cluster_start_s": round(start, 1), "seconds": round(r.seconds, 2), "result": r}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", nargs="?", type=Path, help="image folder (default: Fashion-MNIST PNGs)")
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--layouts", default="1x2,2x1,4x1,4x5", help="NODESxCPUS, comma-separated")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import numpy as np
    from ray_extract import fashion_folder

    from featx.backbones.resolve import resolve_backbone
    from featx.extract import extract

    os.environ.setdefault("RAY_worker_niceness", "0")  # as featx's own local start
    folder = args.folder or fashion_folder(args.images)
    bb = resolve_backbone(args.backbone)
    for p in folder.rglob("*"):  # a warm page cache for every run alike
        if p.is_file():
            p.read_bytes()
    tmp = Path(tempfile.mkdtemp(prefix="featx-cluster-"))
    local = extract(folder, bb, store=tmp / "local", write=False, batch_size=args.batch_size,
                    device="cpu", engine="local")
    print(f"local engine: {local.seconds:.1f} s for {local.stats.embedded} images", flush=True)
    rows = []
    for i, layout in enumerate(args.layouts.split(",")):
        n, c = (int(v) for v in layout.lower().split("x"))
        row = run_layout(folder, bb, n, c, tmp / f"ray{i}", args.batch_size)
        r = row.pop("result")
        same = r.table.keys == local.table.keys
        row["identical"] = bool(same and np.array_equal(r.table.X, local.table.X))
        row["ratio_to_local"] = round(row["seconds"] / local.seconds, 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = rows[0]["seconds"]
    for row in rows:
        row[f"ratio_to_{rows[0]['layout']}"] = round(row["seconds"] / base, 3)
    out = {"images": local.stats.embedded, "local_seconds": round(local.seconds, 2),
           "cpus": os.cpu_count(), "layouts": rows}
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
