"""CLI command for the picture of the embedding space: featx plot TABLE."""

from __future__ import annotations

import click

from featx.cli.options import emit, json_option, progress_bar, quiet_option


@click.command("plot")
@click.argument("table", type=click.Path())
@click.option("--method", type=click.Choice(["auto", "umap", "tsne", "pca"]), default="auto", show_default=True,
              help="auto: UMAP where umap-learn is installed (the 'plot' extra), else t-SNE.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Folder for the PNG and HTML (default: the table's folder).")
@click.option("--max-points", type=click.IntRange(1), default=5000, show_default=True,
              help="Subsample larger tables to this many points, per class.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the subsample and the projection.")
@quiet_option
@json_option
def plot_cmd(table: str, method: str, out_dir, max_points: int, seed: int, quiet: bool, as_json: bool) -> None:
    """Draw a 2-D map of TABLE's embeddings, coloured by label: a PNG and an interactive HTML page."""
    from featx.plot import plot_embeddings

    with progress_bar(quiet or as_json) as p:
        r = plot_embeddings(table, out_dir, method=method, max_points=max_points, seed=seed, progress=p)
    lines = [f"{r.method} map of {r.points} of {r.rows} images, {len(r.classes)} classes ({r.seconds:.1f} s)",
             *[f"  {n}" for n in r.notes],
             f"png:  {r.png}", f"html: {r.html}  (hover for images; {r.thumbnails} thumbnails)"]
    emit(r.to_dict(), as_json, lines)
