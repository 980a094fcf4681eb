"""CLI commands for backbones and extraction: models, export, extract."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import click

from featx.backbones.cards import DECODERS
from featx.cli.options import (
    backbone_option,
    batch_options,
    crop_option,
    device_option,
    emit,
    features_option,
    json_option,
    progress_bar,
    quiet_option,
    store_option,
    weights_option,
)
from featx.errors import FeatXError


@click.command("models")
@click.argument("pattern", default="*")
@click.option("--timm", "from_timm", is_flag=True,
              help="List timm's pretrained weight sets instead (use one as --backbone timm:NAME).")
@json_option
def models_cmd(pattern: str, from_timm: bool, as_json: bool) -> None:
    """List the backbones featx knows (PATTERN is a wildcard, e.g. 'efficientnet*').

    With --timm, list timm's pretrained models matching PATTERN (e.g. 'convnext_tiny*'):
    any of them works as --backbone timm:NAME.
    """
    if from_timm:
        _list_timm(pattern, as_json)
        return
    from featx.backbones.cards import list_cards

    cards = list_cards(pattern)
    rows = [_card_row(c) for c in cards]
    if as_json:
        click.echo(json.dumps(rows))
        return
    click.echo(f"{'name':<20} {'dim':>5} {'input':>5} {'params':>7} {'top-1':>6}  {'licence':<13} "
               f"{'weights from':<16} {'offline':<8} description")
    for r in rows:
        params = f"{r['params'] / 1e6:.1f}M" if r["params"] else "?"
        top1 = f"{r['imagenet_top1']:.1f}" if r["imagenet_top1"] is not None else "?"
        click.echo(f"{r['name']:<20} {r['dim']:>5} {r['input']:>5} {params:>7} {top1:>6}  "
                   f"{r['license'] or '?':<13} {r['source']:<16} {'yes' if r['offline'] else 'no':<8} "
                   f"{r['description']}")
    if rows:
        click.echo("params and top-1 (ImageNet-1k, %) are the published model's, classifier included; "
                   "--json gives their sources")
    click.echo("... and any timm model as timm:NAME (`featx models --timm 'PATTERN'` lists them)")


def _card_row(c) -> dict:
    pub = c.published
    return {"name": c.name, "dim": c.dim, "input": c.preprocess.input_size, "source": c.source,
            "offline": c.offline, "blocks": len(c.blocks), "description": c.description,
            "license": c.license, "params": pub.params if pub else None,
            "imagenet_top1": pub.imagenet_top1 if pub else None, "published_source": pub.source if pub else None}


def _list_timm(pattern: str, as_json: bool) -> None:
    from featx.backbones.cards import list_pretrained

    rows = list_pretrained(pattern)
    if as_json:
        click.echo(json.dumps([asdict(r) for r in rows]))
        return
    if not rows:
        raise FeatXError(f"timm has no pretrained model matching {pattern!r}; try a wildcard, e.g. 'resnet5*'")
    width = max(len(r.name) for r in rows)
    click.echo(f"{'name':<{width}} {'input':>5} {'crop':>5}  {'interp':<8} {'offline':<8} license")
    for r in rows:
        note = f"  (not usable: {r.unsupported})" if r.unsupported else ""
        click.echo(f"{r.name:<{width}} {r.input_size:>5} {r.crop_pct:>5.3f}  {r.interpolation:<8} "
                   f"{'yes' if r.offline else 'no':<8} {r.license}{note}")


@click.command("export")
@click.argument("name", metavar="NAME|timm:NAME|FILE.onnx")
@weights_option
@click.option("--preprocess", type=click.Path(exists=True, dir_okay=False), default=None,
              help="JSON preprocessing spec, for your own ONNX file.")
@click.option("--force", is_flag=True, help="Export again even if a cached export exists.")
@features_option
@click.option("--layers", default=None, metavar="NAME,NAME,...",
              help="With your own FILE.onnx and --features multi: the tensors (4-D NCHW node outputs, "
                   "shallow to deep) to pool. Default: the last feature map at each spatial size.")
@crop_option
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="fp16: a float16 graph for GPUs (uint8 in, float32 embedding out), in its own directory.")
@click.option("--quantize", type=click.Choice(["int8"]), default=None,
              help="Also make a static int8 (QDQ, per-channel) model calibrated on --calibrate.")
@click.option("--calibrate", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Folder of your images to calibrate int8 on (a few hundred are sampled).")
@click.option("--calib-images", type=click.IntRange(1), default=300, show_default=True)
@click.option("--guard-images", type=click.IntRange(10), default=1000, show_default=True,
              help="Other images on which the int8 damage is measured.")
@click.option("--calibration-method", type=click.Choice(["minmax", "percentile", "entropy"]),
              default="minmax", show_default=True)
@click.option("--max-loss", type=float, default=0.5, show_default=True,
              help="Refuse int8 above this many points of linear-probe accuracy lost.")
@click.option("--force-quantize", is_flag=True, help="Keep the int8 model even if the guard refuses it.")
@json_option
def export_cmd(name: str, weights: str | None, preprocess: str | None, force: bool, features: str | None,
               layers: str | None, crop: str | None, precision: str, quantize: str | None, calibrate: Path | None,
               calib_images: int,
               guard_images: int, calibration_method: str, max_loss: float, force_quantize: bool,
               as_json: bool) -> None:
    """Export a backbone to ONNX (uint8 NHWC in, embedding out), parity-checked against torch.

    NAME is a card (`featx models`), timm:NAME for any timm model (`featx models --timm`),
    or your own FILE.onnx. With --quantize int8 --calibrate DIR, also writes an int8 model
    and prints how much it changes the embeddings; pass its directory as --backbone to any command.
    """
    from featx.backbones.cards import Preprocess
    from featx.backbones.features import DEFAULT_FEATURES
    from featx.backbones.resolve import card_features, export_backbone

    if quantize and calibrate is None:
        raise click.UsageError("--quantize int8 needs --calibrate DIR (a folder of your images)")
    if quantize and precision != "fp32":
        raise click.UsageError("--quantize int8 starts from the fp32 export; drop --precision")
    if name.lower().endswith(".onnx") and precision != "fp32":
        raise click.UsageError("--precision applies to backbone cards; your ONNX file is used as it is")
    pre = Preprocess.from_dict(_read_spec(preprocess)) if preprocess else None
    names = [n.strip() for n in layers.split(",") if n.strip()] if layers is not None else None
    features = card_features(name, features)  # a card exports extract's default (multi) unless told
    bb = export_backbone(name, weights, pre, force=force, precision=precision, features=features, crop=crop,
                         layers=names)
    side = bb.sidecar
    summary = {"name": bb.name, "onnx": str(bb.onnx_path), "dim": bb.dim, "fingerprint": bb.fingerprint,
               "parity": asdict(side.parity) if side.parity else {}, "preprocess": bb.preprocess.to_dict(),
               "precision": side.precision, "features": side.feature_recipe}
    # not what `--backbone NAME` gives: say to pass the directory
    variant = precision != "fp32" or features not in (None, DEFAULT_FEATURES) or crop not in (None, "center")
    lines = [f"{bb.name}: {bb.onnx_path}" + ("  (use it as --backbone)" if variant else ""),
             f"  dim {bb.dim}, input {bb.preprocess.input_size}px uint8 NHWC, {side.precision}, "
             f"fingerprint {bb.fingerprint}"]
    rec = side.features
    if rec is not None and "layers" in rec:  # an ONNX file's multi: which of its tensors
        summary["layers"] = rec["layers"]
        lines.append(f"  multi over {', '.join(rec['layers'])} ({rec.get('layers_chosen')})")
    if side.parity:
        par = side.parity
        lines.append(f"  parity vs torch on {par.images} photos: max abs diff {par.max_abs_diff:.2e} "
                     f"(relative {par.max_rel_diff:.2e})"
                     + (f", min cosine {par.min_cosine:.5f}" if par.min_cosine is not None else ""))
    if quantize:
        from featx.backbones.quantize import quantize_backbone

        with progress_bar() as p:
            q = quantize_backbone(bb, calibrate, calib_images=calib_images, guard_images=guard_images,
                                  method=calibration_method, max_loss=max_loss, force=force_quantize,
                                  progress=p)
        g = q.sidecar.quantization.guard
        summary["int8"] = {"dir": str(q.onnx_path.parent), "fingerprint": q.fingerprint, "guard": g.to_dict()}
        lines += _guard_lines(q.onnx_path.parent, g)
    emit(summary, as_json, lines)


def _read_spec(path: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise FeatXError(f"--preprocess {path}: not a JSON preprocessing spec ({e})") from None


def _guard_lines(directory: Path, g) -> list[str]:
    lines = [f"int8: {directory}  (use it as --backbone)",
             f"  guard on {g.images} images: cosine to fp32 mean {g.cosine_mean:.4f}, min {g.cosine_min:.4f}"]
    if g.loss_points is not None:
        lines.append(f"  linear probe: {100 * g.probe_accuracy_fp32:.2f}% fp32, "
                     f"{100 * g.probe_accuracy_int8:.2f}% int8 (int8 - fp32: {-g.loss_points:+.2f} points)")
    if g.forced:
        lines.append("  WARNING: above --max-loss, kept because of --force-quantize")
    return lines


@click.command("extract")
@click.argument("root", metavar="ROOT|TABLE", type=click.Path(path_type=Path))
@backbone_option
@weights_option
@features_option
@crop_option
@click.option("--out", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Output table (Parquet). Default: ./<folder or table name>.featx.parquet")
@store_option
@batch_options
@device_option
@click.option("--shard-size", type=click.IntRange(1), default=2048, show_default=True,
              help="Rows per store shard; a killed run loses at most one shard (or 10 s) of work.")
@click.option("--no-draft", is_flag=True, help="Decode JPEGs at full size (slower; for comparison).")
@click.option("--decoder", type=click.Choice(DECODERS), default=None,
              help="JPEG decoder (default: the backbone's, pillow). simplejpeg decodes with "
                   "libjpeg-turbo through simplejpeg; each decoder has its own store entries.")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: threads on this machine; ray: Ray tasks and actors on a cluster (pip install 'featx[ray]').")
@click.option("--address", default=None, metavar="ADDR",
              help="Ray cluster for --engine ray: auto, HOST:PORT or ray://HOST:10001. "
                   "Default: start a local Ray.")
@click.option("--follow-symlinks", is_flag=True,
              help="Follow links into other class folders and out of ROOT too (labels come from where the "
                   "link sits). By default those are skipped and listed in the report.")
@click.option("--force", is_flag=True, help="Replace --out even if it is not a featx table.")
@quiet_option
@json_option
def extract_cmd(root: Path, backbone, weights, features, crop, out, store, batch_size, workers, device,
                shard_size, no_draft, decoder, engine, address, follow_symlinks, force, quiet,
                as_json) -> None:
    """Embed every image under ROOT (ImageFolder layout gives labels), reusing the cache.

    Instead of a folder, a CSV/TSV/Parquet TABLE with a `path` column (relative to the
    table's folder, or absolute) and an optional `label` column lists the images.
    """
    from featx.extract import extract as run

    if address is not None and engine != "ray":
        raise click.UsageError("--address needs --engine ray")
    with progress_bar(quiet) as p:
        r = run(root, backbone, out=out, store=store, weights=weights, batch_size=batch_size,
                workers=workers, device=device, draft=not no_draft, decoder=decoder,
                shard_size=shard_size, progress=p, engine=engine, address=address,
                keep_embeddings=False, follow_symlinks=follow_symlinks, features=features, crop=crop,
                force=force)
    s = r.summary()
    rate = f", {s['images_per_second']} img/s" if s["images_per_second"] else ""
    lines = [
        f"device: {r.provider} (asked: {device})",
        f"{s['images']} images: {s['embedded']} embedded, {s['cached']} from cache, "
        f"{s['failed']} failed ({s['seconds']} s{rate})",
        f"table: {s['out']}  ({s['rows']} rows x {r.backbone.dim}, {s['classes']} classes)",
    ]
    if s["failed"]:
        for path, why in r.stats.failures[:5]:
            lines.append(f"  failed {path}: {why}")
        if s["failed"] > 5:
            lines.append(f"  ... {s['failed'] - 5} more")
    if s["skipped"]:
        lines.append(f"{s['skipped']} skipped (see report)")
        for path, why in r.skipped[:3]:
            lines.append(f"  skipped {path}: {why}")
    if s["failed"] or s["skipped"]:
        lines.append(f"report: {s['report']}")
    emit(s, as_json, lines)
    if s["rows"] == 0:
        raise FeatXError(f"no image under {root} could be embedded; see {s['report']}")
