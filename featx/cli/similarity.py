"""CLI commands over embedding tables: featx neighbors | duplicates (featx.similarity)."""

from __future__ import annotations

import click

from featx.cli.options import (
    backbone_option,
    batch_options,
    device_option,
    emit,
    json_option,
    progress_bar,
    quiet_option,
    store_option,
)

INDEX_CHOICES = ("auto", "exact", "approx")


def index_option(f):
    return click.option(
        "--index", type=click.Choice(INDEX_CHOICES), default="auto", show_default=True,
        help="exact: blocked matrix products (default up to 1M rows); approx: an HNSW index "
             "(hnswlib, the 'ann' extra), its recall against exact search measured and printed; "
             "auto: exact up to 1M rows, approx above.")(f)


def out_option(f):
    return click.option("--out", "-o", type=click.Path(dir_okay=False), default=None,
                        help="Write every result to this .csv, .tsv or .json file.")(f)


def show_option(default: int):
    return click.option("--show", type=click.IntRange(0), default=default, show_default=True,
                        help="How many results to print on the terminal (the file gets all).")


def _index_lines(s) -> list[str]:
    if s.method == "approx":
        line = (f"index: approximate (HNSW), built in {s.build_s:.2f} s, searched in {s.search_s:.2f} s; "
                f"recall@k against exact search {s.recall:.4f} on {s.recall_queries} sampled queries")
    else:
        line = f"index: exact, searched in {s.search_s:.2f} s"
    return [line] + ([f"note: {s.note}"] if s.note else [])


@click.command("neighbors")
@click.argument("query", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--in", "table", required=True, type=click.Path(exists=True), metavar="TABLE",
              help="The featx table to search (written by `featx extract`).")
@click.option("-k", type=click.IntRange(1), default=10, show_default=True, help="Neighbours per query image.")
@index_option
@out_option
@show_option(5)
@backbone_option
@device_option
@store_option
@batch_options
@quiet_option
@json_option
def neighbors_cmd(query, table, k, index, out, show, backbone, device, store, batch_size, workers,
                  quiet, as_json) -> None:
    """Nearest images (cosine) in TABLE for each QUERY: image files, folders, or a featx table.

    Query images are embedded with TABLE's own backbone (cached); a query table from
    another backbone is refused.
    """
    from featx.embed.scan import display_path
    from featx.similarity.neighbours import neighbors, write_neighbors

    with progress_bar(quiet or as_json) as p:
        r = neighbors(list(query), table, k, index=index, backbone=backbone, device=device, store=store,
                      batch_size=batch_size, workers=workers, progress=p)
    lines = [f"{len(r.query_files)} query image(s), {len(r.paths)} rows in {table}, k={r.k}"]
    for i, q in enumerate(r.query_files[:show]):
        lines.append(f"{display_path(q)}" + (f"  [{r.query_labels[i]}]" if r.query_labels[i] else ""))
        for rank in range(r.k):
            j = int(r.search.index[i, rank])
            lines.append(f"  {rank + 1:>3}  {r.search.similarity[i, rank]:.4f}  "
                         f"{r.labels[j] or '-':<14} {display_path(r.paths[j])}")
    if len(r.query_files) > show:
        lines.append(f"... {len(r.query_files) - show} more query image(s)" + ("" if out else "; --out FILE for all"))
    lines += [f"failed: {display_path(f)}: {why}" for f, why in r.failures]
    lines += _index_lines(r.search)
    summary = r.summary()
    if out:
        summary["out"] = str(write_neighbors(r, out))
        lines.append(f"wrote {out}")
    emit(summary, as_json, lines)


@click.command("duplicates")
@click.argument("table", type=click.Path(exists=True))
@click.option("--across", type=click.Path(exists=True), default=None, metavar="TABLE2",
              help="Only pairs between TABLE and TABLE2, e.g. train and test: counts the images of "
                   "TABLE2 with a near copy in TABLE (leakage).")
@click.option("--threshold", type=click.FloatRange(-1.0, 1.0), default=None,
              help="Cosine similarity at or above which two images count as near-duplicates. "
                   "Default: calibrated on TABLE's own images (altered copies of a sample must be "
                   "found, distinct images must not be; see docs/similarity.md).")
@click.option("--per-image", type=click.IntRange(1), default=20, show_default=True,
              help="Most near copies listed per image.")
@index_option
@out_option
@show_option(20)
@click.option("--backbone", "-b", default=None, metavar="NAME|DIR|FILE.onnx",
              help="The backbone that made TABLE, when its recorded export is gone (it embeds the "
                   "calibration's altered copies); one with another fingerprint is refused.")
@store_option
@device_option
@quiet_option
@json_option
def duplicates_cmd(table, across, threshold, per_image, index, out, show, backbone, store, device, quiet,
                   as_json) -> None:
    """Near-duplicate images within TABLE, or between TABLE and TABLE2 (train/test leakage)."""
    from featx.embed.scan import display_path
    from featx.similarity.near_duplicates import duplicates, write_duplicates

    with progress_bar(quiet or as_json) as p:
        r = duplicates(table, across, "auto" if threshold is None else threshold, index=index,
                       per_image=per_image, backbone=backbone, store=store, device=device, progress=p)
    s = r.summary()
    where = f"between {table} and {across}" if across else f"in {table} ({s['rows']} rows)"
    lines = []
    if r.calibration is not None:
        c = r.calibration
        lines += [f"threshold: cosine {c.threshold:.4f}, calibrated on {table}: {c.reason}",
                  f"  measured: {c.recall:.1%} of {c.copies} altered copies found, {c.false_rate:.2%} of "
                  f"{c.distinct} distinct images paired" + ("" if c.met else
                                                             " (targets >= 95% / <= 0.1%: not met)")]
    lines += [f"{s['pairs']} near-duplicate pair(s) at cosine >= {r.threshold:g} {where}: "
             f"{s['identical_pairs']} byte-identical; {s['clusters']} cluster(s), largest {s['largest_cluster']}"]
    if across:
        lines.append(f"leakage: {r.leaked} of {s['across_rows']} images of {across} have a near copy in "
                     f"{table}; {r.leaked_other_label} of them with another label")
    if r.capped:
        lines.append(f"{r.capped} image(s) have {per_image} or more near copies: raise --per-image to list them all")
    for row in r.rows()[:show]:
        same = "  (same bytes)" if row["identical"] else ""
        lines.append(f"  {row['similarity']:.4f}  {display_path(row['path_a'])} [{row['label_a'] or '-'}]"
                     f"  ~  {display_path(row['path_b'])} [{row['label_b'] or '-'}]{same}")
    if len(r) > show:
        lines.append(f"  ... {len(r) - show} more pair(s)" + ("" if out else "; --out FILE for all"))
    lines += _index_lines(r.search)
    if out:
        s["out"] = str(write_duplicates(r, out))
        lines.append(f"wrote {out}")
    emit(s, as_json, lines)
