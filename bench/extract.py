"""Extraction benchmark: featx end to end against the shared-core bound, its old path, torch.

Run: .venv/bin/python bench/extract.py [--n 300] [--repeat 2] [--baseline-ref REF]

On a folder of camera-size JPEGs (scikit-image's photos, upscaled to 1-16 MP with
random flips), prints side by side in one run:
  - decoding alone (featx's reader pool, no model), for each decoder (simplejpeg, pillow)
  - the model alone on pre-decoded pixels: as featx's engine runs it on a CPU (the readers'
    one-thread calls), as one all-cores session, and ORT's best session setting
  - the shared-core bound for each decoder, 1 / (1/decode + 1/model) with featx's faster
    model rate: both stages on the same cores, neither waiting for the other
  - featx extract end to end with the default decoder and with ``--decoder pillow``,
    each as a share of its bound
  - with --baseline-ref REF: featx as it was at git REF (its own defaults), end to end
  - the baseline a user would write: the same weights in torch eager mode, fed by a
    torch DataLoader with the same number of workers
  - Fashion-MNIST-size PNGs (28 px): featx end to end against the model alone
  - JPEG draft decoding off; a second run over unchanged data; peak RSS at 1x and 10x
All timings are wall clock on a possibly shared machine: read the ratios of one run,
not the absolutes, and use --repeat (best of N) where the load moves.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DECODERS = ("simplejpeg", "pillow")


def make_photos(dest: Path, n: int, seed: int = 0) -> Path:
    """n distinct camera-size JPEGs in an ImageFolder (3 classes), cached between runs."""
    import skimage.data as sd
    from PIL import Image

    marker = dest / f".done-{n}-{seed}"
    if marker.exists():
        return dest
    srcs = [sd.chelsea(), sd.astronaut(), sd.coffee(), sd.rocket(), sd.cat(), sd.immunohistochemistry()]
    rng = np.random.default_rng(seed)
    for i in range(n):
        src = Image.fromarray(srcs[i % len(srcs)])
        w = int(rng.choice([1024, 1600, 2048, 3000, 4000]))
        h = int(w * rng.choice([0.75, 0.5625, 1.0]))
        big = src.resize((w, h), Image.BILINEAR)
        if i % 2:
            big = big.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        cls = dest / f"class{i % 3}"
        cls.mkdir(parents=True, exist_ok=True)
        big.save(cls / f"img{i:05d}.jpg", quality=int(rng.integers(80, 95)))
    marker.touch()
    return dest


def make_small_pngs(dest: Path, n: int) -> Path:
    """n Fashion-MNIST PNGs (28 px); without Debian's dataset, 28 px crops of skimage's photos."""
    from featx.datasets import (
        FASHION_MNIST_CLASSES,
        fashion_mnist,
        fashion_mnist_available,
        write_image_folder,
    )

    if fashion_mnist_available():
        x, y = fashion_mnist("train")
        return write_image_folder(dest, x[:n], y[:n], FASHION_MNIST_CLASSES)
    import skimage.data as sd

    cam = sd.camera()
    rng = np.random.default_rng(0)
    idx = rng.integers(0, cam.shape[0] - 28, (n, 2))
    x = np.stack([cam[i:i + 28, j:j + 28] for i, j in idx])
    return write_image_folder(dest, x, np.arange(n) % 2, ["a", "b"])


def replicate(src: Path, dest: Path, times: int) -> Path:
    """``times`` distinct copies of every file: trailing bytes after the JPEG end change the hash only."""
    for p in src.rglob("*.jpg"):
        data = p.read_bytes()
        for t in range(times):
            q = dest / p.parent.name / f"{p.stem}-{t}.jpg"
            q.parent.mkdir(parents=True, exist_ok=True)
            if not q.exists():
                q.write_bytes(data + f"featx-copy-{t}".encode())
    return dest


def _hwm_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def run_cli(args: list[str], env: dict, cwd: Path | None = None) -> tuple[dict, float, float]:
    """Run `featx extract ... --json` as a child; returns (summary, wall s, peak RSS MiB).

    Peak RSS is the child's own VmHWM, polled from /proc: getrusage's ru_maxrss
    would count this (large) benchmark process, which the child is forked from.
    ``python -m`` puts its working directory first on sys.path: ``cwd`` decides which
    featx runs (the default, a temporary directory, leaves it to the environment).
    """
    t = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "featx.cli", *args, "--json", "-q"], env=env,
                         cwd=cwd or tempfile.gettempdir(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    while p.poll() is None:
        peak = max(peak, _hwm_kib(p.pid) or 0)
        time.sleep(0.02)
    wall = time.perf_counter() - t
    out, err = p.communicate()
    if p.returncode != 0:
        raise SystemExit(f"featx extract failed: {err}")
    return json.loads(out), wall, peak / 1024


def ort_alone(backbone, pixels: np.ndarray, batch: int, spin: bool, model_batch: int | None) -> float:
    from featx.embed.runtime import Encoder

    enc = Encoder(backbone, device="cpu", spin=spin, model_batch=model_batch)
    enc(pixels[:batch])  # warm-up
    t = time.perf_counter()
    for i in range(0, len(pixels), batch):
        enc(pixels[i:i + batch])
    return len(pixels) / (time.perf_counter() - t)


def model_only(backbone, pixels: np.ndarray, batch: int) -> float:
    """The model alone on pre-decoded pixels, as featx's engine runs it (its Encoder's settings)."""
    from featx.embed.runtime import Encoder

    enc = Encoder(backbone, device="cpu")
    enc(pixels[:batch])  # warm-up
    t = time.perf_counter()
    for i in range(0, len(pixels), batch):
        enc(pixels[i:i + batch])
    return len(pixels) / (time.perf_counter() - t)


def model_readers(backbone, pixels: np.ndarray, workers: int) -> float:
    """The model as featx's engine runs it on a CPU: ``workers`` threads, each embedding tasks of
    ``READER_TASK`` images through the single-threaded twin (``Encoder.for_readers``); 0 if that
    schedule does not apply (fewer workers than cores)."""
    from concurrent.futures import ThreadPoolExecutor

    from featx.embed.runtime import READER_TASK, Encoder

    twin = Encoder(backbone, device="cpu").for_readers(workers)
    if twin is None:
        return 0.0
    twin(pixels[:READER_TASK])  # warm-up
    tasks = [pixels[i:i + READER_TASK] for i in range(0, len(pixels), READER_TASK)]
    t = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(twin, tasks))
    return len(pixels) / (time.perf_counter() - t)


def model_ceiling(backbone, pixels: np.ndarray, batch: int) -> float:
    """The model alone, best of several ONNX Runtime session settings: what ORT can do here."""
    return max(ort_alone(backbone, pixels, batch, spin, mb) for spin in (False, True) for mb in (None, 1, 4))


def decode_only(folder: Path, pre, batch: int, workers: int) -> float:
    """Read + decode + resize + crop with featx's reader pool and no model: the decode ceiling."""
    from concurrent.futures import ThreadPoolExecutor

    from featx.embed.scan import scan
    from featx.engines.local import bounded_map, chunks, decode_batch

    items = [(i, str(folder / it.path), "") for i, it in enumerate(scan(folder).items)]
    t = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        n = sum(len(r[0]) for r in bounded_map(lambda b: decode_batch(b, pre), chunks(items, batch), pool,
                                                 window=workers + 2))
    return n / (time.perf_counter() - t)


def torch_baseline(folder: Path, batch: int, workers: int) -> float:
    """What a user would write: torchvision ImageFolder + transforms + DataLoader + eager model."""
    import torch
    from torchvision import datasets, transforms

    from featx.backbones.cards import get_card
    from featx.backbones.zoo import build

    card = get_card("efficientnet_lite0")
    model, _, _ = build(card)
    pre = card.preprocess
    tf = transforms.Compose([
        transforms.Resize(pre.resize_size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(pre.input_size),
        transforms.ToTensor(),
        transforms.Normalize([m / 255 for m in pre.mean], [s / 255 for s in pre.std]),
    ])
    loader = torch.utils.data.DataLoader(datasets.ImageFolder(str(folder), tf), batch_size=batch,
                                         num_workers=workers)
    n = 0
    t = time.perf_counter()
    with torch.inference_mode():
        for x, _ in loader:
            model(x)
            n += len(x)
    return n / (time.perf_counter() - t)


def featx_at(ref: str) -> tuple[Path, dict]:
    """featx as it was at git ``ref``, to run its CLI with its own defaults: today's path as a baseline.

    The package is taken with ``git archive`` into a temporary directory (the repository is not
    touched) and gets its own FEATX_HOME, so its export and store are its own. Returns (its
    directory, the environment to run it in), after exporting its backbone once.
    """
    tmp = Path(tempfile.mkdtemp(prefix="featx-bench-ref-"))
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "featx"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive.stdout, check=True)
    env = {**os.environ, "FEATX_HOME": str(tmp / "home"), "PYTHONPATH": str(tmp)}
    code = subprocess.run([sys.executable, "-c", "import featx; print(featx.__file__)"], env=env, cwd=tmp,
                          check=True, capture_output=True, text=True).stdout.strip()
    if not code.startswith(str(tmp)):  # the baseline must be the old code, not this checkout
        raise SystemExit(f"--baseline-ref {ref}: the child imported featx from {code}, not from {tmp}")
    subprocess.run([sys.executable, "-m", "featx.cli", "export", "efficientnet_lite0"], env=env, cwd=tmp,
                   check=True, capture_output=True)
    return tmp, env


def featx_e2e(folder: Path, home: Path, common: list[str], env: dict, tag: str,
              extra: list[str]) -> tuple[float, dict, float]:
    """One fresh-store CLI run: (images/s of the embedding phase, summary, peak RSS MiB)."""
    summary, _, rss = run_cli(["extract", str(folder), "--out", str(home / f"{tag}.parquet"),
                               "--store", str(home / f"s-{tag}"), *common, *extra], env, cwd=home)
    return summary["images_per_second"], summary, rss


def camera_section(a, bb, photos: Path, home: Path, env: dict, common: list[str],
                   ref: tuple[Path, dict] | None) -> dict:
    """Decode-only and model-only per decoder, the bounds, featx end to end per decoder.

    Every figure is measured once per round, the rounds one after the other, and the best
    round of each is kept: a load that comes and goes then touches all of them alike.
    """
    from featx.backbones.artifact import with_decoder
    from featx.backbones.cards import DEFAULT_DECODER
    from featx.embed.images import load_image
    from featx.embed.scan import scan

    r: dict = {}
    pixels = np.stack([load_image(photos / it.path, bb.preprocess) for it in scan(photos).items])
    r["model_ceiling_ips"] = model_ceiling(bb, pixels, a.batch_size)
    for k in range(a.repeat):
        keep(r, "model_session_ips", model_only(bb, pixels, a.batch_size))
        keep(r, "model_readers_ips", model_readers(bb, pixels, a.workers))
        for dec in DECODERS:
            keep(r, f"decode_{dec}_ips", decode_only(photos, with_decoder(bb, dec).preprocess, a.batch_size,
                                                     a.workers))
            ips, summary, rss = featx_e2e(photos, home, common, env, f"{dec}-{k}", ["--decoder", dec])
            keep(r, f"featx_{dec}_ips", ips)
            if dec == DEFAULT_DECODER and k == 0:  # the rerun section re-runs the default
                r["featx_first_run_s"], r["rss_1x_mib"], r["first_store"] = summary["seconds"], rss, f"s-{dec}-{k}"
        if ref is not None:  # featx as it was, with its own defaults
            keep(r, "featx_ref_ips", featx_e2e(photos, ref[0], common, ref[1], f"ref-{k}", [])[0])
    # the bound takes featx's faster way to run the model on these cores
    r["model_ips"] = max(r["model_session_ips"], r["model_readers_ips"])
    for dec in DECODERS:
        r[f"bound_{dec}_ips"] = bound(r, dec)
        r[f"featx_{dec}_of_bound_rounds"] = round_ratios(r, f"featx_{dec}_ips", lambda f, d=dec: bound(f, d))
        if ref is not None:
            r[f"featx_{dec}_vs_ref_rounds"] = round_ratios(r, f"featx_{dec}_ips", "featx_ref_ips")
    return r


def bound(f: dict, dec: str) -> float:
    """The shared-core bound, 1 / (1/decode + 1/model), with featx's faster model rate."""
    model = max(f["model_session_ips"], f["model_readers_ips"])
    return 1 / (1 / f[f"decode_{dec}_ips"] + 1 / model)


def keep(r: dict, key: str, value: float) -> None:
    """Keep the best of the rounds, and each round's figure (``rounds``)."""
    r[key] = max(r.get(key, 0.0), value)
    r.setdefault("rounds", {}).setdefault(key, []).append(value)


def round_ratios(r: dict, num: str, den) -> list[float]:
    """``num / den`` within each round (``den``: a key, or a function of the round's figures).

    The machine's speed drifts between rounds; a ratio of two figures of the same round
    cancels the drift, where a ratio of two bests may pair a fast moment with a slow one.
    """
    rounds = r["rounds"]
    n = len(rounds[num])
    fig = [{k: v[i] for k, v in rounds.items() if len(v) == n} for i in range(n)]
    return [f[num] / (den(f) if callable(den) else f[den]) for f in fig]


def median(xs: list[float]) -> float:
    return float(np.median(xs))


def small_png_section(a, bb, home: Path, env: dict, common: list[str]) -> dict:
    """Fashion-MNIST-size PNGs: the model bounds these, so end to end is read against model-only."""
    from featx.embed.images import load_image
    from featx.embed.scan import scan

    folder = make_small_pngs(a.data / f"png28-{a.pngs}", a.pngs)
    # all the images: the model alone runs as long as featx does, so both see the same machine
    pixels = np.stack([load_image(folder / it.path, bb.preprocess) for it in scan(folder).items])
    r: dict = {}
    for k in range(a.repeat):
        keep(r, "png_model_session_ips", model_only(bb, pixels, a.batch_size))
        keep(r, "png_model_readers_ips", model_readers(bb, pixels, a.workers))
        keep(r, "png_model_ips", max(r["rounds"]["png_model_session_ips"][-1],
                                     r["rounds"]["png_model_readers_ips"][-1]))
        keep(r, "png_decode_ips", decode_only(folder, bb.preprocess, a.batch_size, a.workers))
        keep(r, "png_featx_ips", featx_e2e(folder, home, common, env, f"png-{k}", [])[0])
    r["png_featx_of_model_rounds"] = round_ratios(r, "png_featx_ips", "png_model_ips")
    return r


def rerun_section(a, bb, photos: Path, home: Path, env: dict, common: list[str], first_store: str) -> dict:
    """Draft off, a second run over unchanged data, peak RSS at 10x."""
    from featx.extract import extract

    r: dict = {}
    store = home / first_store  # the first end-to-end run's store
    _, r["featx_second_run_cli_s"], _ = run_cli(["extract", str(photos), "--out", str(home / "b.parquet"),
                                                 "--store", str(store), *common], env)
    times = []
    for _ in range(2):  # the first in-process call also pays one-time imports (pyarrow, pandas)
        t = time.perf_counter()
        again = extract(photos, bb, out=home / "b2.parquet", store=store, device="cpu")
        times.append(time.perf_counter() - t)
        assert again.stats.embedded == 0
    r["featx_second_run_cold_s"], r["featx_second_run_s"] = times
    s3, _, _ = run_cli(["extract", str(photos), "--out", str(home / "c.parquet"),
                        "--store", str(home / "s-nodraft"), "--no-draft", *common], env)
    r["featx_nodraft_ips"] = s3["images_per_second"]
    if not a.skip_10x:
        big = replicate(photos, a.data / f"photos{a.n}x10", 10)
        s10, _, rss10 = run_cli(["extract", str(big), "--out", str(home / "x10.parquet"),
                                 "--store", str(home / "s10"), *common], env)
        r["rss_10x_mib"], r["featx_10x_ips"], r["featx_10x_first_s"] = rss10, s10["images_per_second"], s10["seconds"]
        t = time.perf_counter()
        extract(big, bb, out=home / "x10b.parquet", store=home / "s10", device="cpu")
        r["featx_10x_second_s"] = time.perf_counter() - t
    return r


def report(a, r: dict) -> None:
    new, old = DECODERS
    row = "  {:<50} {:8.1f} img/s   {}"
    print(f"\nfeatx extraction benchmark: {a.n} camera-size JPEGs, efficientnet_lite0, CPU, "
          f"{r['cores']} cores, batch {a.batch_size}, {a.workers} workers, load {r['load']:.1f} "
          f"(1-min average before the run), best of {a.repeat}")
    print(row.format("model alone, readers' one-thread calls (featx's CPU schedule)", r["model_readers_ips"],
                     "pre-decoded pixels"))
    print(row.format("model alone, one all-cores session", r["model_session_ips"], "pre-decoded pixels"))
    print(row.format("model alone, best ONNX Runtime setting", r["model_ceiling_ips"], "(for reference)"))
    for dec in DECODERS:
        print(row.format(f"decoding alone, {dec}", r[f"decode_{dec}_ips"], ""))
    for dec in DECODERS:
        print(row.format(f"shared-core bound, {dec}", r[f"bound_{dec}_ips"], "1 / (1/decode + 1/model)"))
    for dec in DECODERS:
        print(row.format(f"featx end to end, --decoder {dec}", r[f"featx_{dec}_ips"],
                         f"{r[f'featx_{dec}_ips'] / r[f'bound_{dec}_ips']:.0%} of its bound (target >= 90%); "
                         f"median of the rounds' own ratios {median(r[f'featx_{dec}_of_bound_rounds']):.0%}"))
    print(f"  {'featx default vs --decoder ' + old:<50} {r[f'featx_{new}_ips'] / r[f'featx_{old}_ips']:8.2f}x")
    if "featx_ref_ips" in r:
        print(row.format(f"featx at {a.baseline_ref} (the old path, its defaults)", r["featx_ref_ips"], ""))
        for dec in DECODERS:
            print(f"  {'featx now, --decoder ' + dec + ', vs the old path':<50} "
                  f"{r[f'featx_{dec}_ips'] / r['featx_ref_ips']:8.2f}x   (target >= 1.4x); median of the "
                  f"rounds' own ratios {median(r[f'featx_{dec}_vs_ref_rounds']):.2f}x")
    if "torch_baseline_ips" in r:
        print(row.format("torch eager + DataLoader baseline", r["torch_baseline_ips"],
                         f"featx is {r[f'featx_{new}_ips'] / r['torch_baseline_ips']:.2f}x (target >= 6x)"))
    if "png_featx_ips" in r:
        print(f"\n{a.pngs} Fashion-MNIST-size PNGs (28 px):")
        print(row.format("model alone, readers' one-thread calls", r["png_model_readers_ips"], ""))
        print(row.format("model alone, one all-cores session", r["png_model_session_ips"], ""))
        print(row.format("decoding alone", r["png_decode_ips"], ""))
        print(row.format("featx end to end", r["png_featx_ips"],
                         f"{r['png_featx_ips'] / r['png_model_ips']:.0%} of the faster model-only (target >= 90%); "
                         f"median of the rounds' own ratios {median(r['png_featx_of_model_rounds']):.0%}"))
    if "featx_nodraft_ips" in r:
        print(f"\n  {'featx, JPEG draft off':<50} {r['featx_nodraft_ips']:8.1f} img/s   "
              f"draft on is {r[f'featx_{new}_ips'] / r['featx_nodraft_ips']:.2f}x faster")
        print(f"  second run, unchanged data: {r['featx_second_run_s']:.3f} s in-process (warm) vs first run "
              f"{r['featx_first_run_s']:.2f} s = {r['featx_first_run_s'] / r['featx_second_run_s']:.0f}x faster "
              f"(target >= 50x); first in-process call {r['featx_second_run_cold_s']:.2f} s, as a CLI process "
              f"{r['featx_second_run_cli_s']:.2f} s (Python start-up and imports)")
    if "featx_10x_second_s" in r:
        print(f"  second run at 10x ({10 * a.n} images): {r['featx_10x_second_s']:.3f} s vs first "
              f"{r['featx_10x_first_s']:.2f} s = {r['featx_10x_first_s'] / r['featx_10x_second_s']:.0f}x faster")
        print(f"  peak RSS: {r['rss_1x_mib']:.0f} MiB at 1x, {r['rss_10x_mib']:.0f} MiB at 10x "
              f"({r['rss_10x_mib'] / r['rss_1x_mib']:.2f}x; flat means ~1x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=300, help="photos at 1x")
    ap.add_argument("--pngs", type=int, default=2000, help="Fashion-MNIST-size PNGs (0: skip)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--repeat", type=int, default=1, help="best of N for every rate")
    ap.add_argument("--baseline-ref", default=None, metavar="REF",
                    help="also run featx as it was at this git ref (e.g. main), end to end")
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "featx-bench")
    ap.add_argument("--quick", action="store_true", help="only the decoder/bound/end-to-end figures")
    ap.add_argument("--skip-10x", action="store_true", help="skip the 10x peak-RSS run")
    a = ap.parse_args()

    from featx.backbones.resolve import resolve_backbone

    photos = make_photos(a.data / f"photos{a.n}", a.n)
    home = Path(tempfile.mkdtemp(prefix="featx-bench-home-"))
    env = {**os.environ, "FEATX_HOME": str(home)}
    os.environ["FEATX_HOME"] = str(home)
    bb = resolve_backbone("efficientnet_lite0")
    common = ["--batch-size", str(a.batch_size), "--workers", str(a.workers), "--device", "cpu"]
    r: dict = {"n": a.n, "batch_size": a.batch_size, "workers": a.workers, "cores": os.cpu_count(),
               "load": os.getloadavg()[0], "repeat": a.repeat}
    ref = featx_at(a.baseline_ref) if a.baseline_ref else None
    r.update(camera_section(a, bb, photos, home, env, common, ref))
    if not a.quick:
        r["torch_baseline_ips"] = torch_baseline(photos, a.batch_size, a.workers)
        if a.pngs:
            r.update(small_png_section(a, bb, home, env, common))
        r.update(rerun_section(a, bb, photos, home, env, common, r["first_store"]))
    report(a, r)
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "extract.json").write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
