"""CLI commands for the embedding cache: featx cache info | prune | verify."""

from __future__ import annotations

import re
import time

import click

from featx.cli.options import emit, json_option, progress_bar, quiet_option, store_option

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class Duration(click.ParamType):
    """A duration such as 45s, 90m, 12h, 30d or 2w; converts to seconds."""

    name = "duration"

    def convert(self, value, param, ctx) -> float:
        if isinstance(value, (int, float)):
            return float(value)
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", str(value).lower())
        if not m:
            self.fail(f"{value!r} is not a duration like 30d, 12h, 90m, 45s or 2w", param, ctx)
        return float(m.group(1)) * _UNITS[m.group(2)]


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"  # pragma: no cover


def _ago(t: float | None) -> str:
    if t is None:
        return "never"
    days = (time.time() - t) / 86400
    return time.strftime("%Y-%m-%d", time.localtime(t)) + (f" ({days:.0f} d ago)" if days >= 1 else " (today)")


@click.group("cache")
def cache_cmd() -> None:
    """Inspect, trim and check the embedding cache (the store under $FEATX_HOME/store)."""


@cache_cmd.command("info")
@store_option
@json_option
def info_cmd(store, as_json: bool) -> None:
    """Size, rows, shards and last use of each backbone's cached embeddings."""
    from featx.cache import cache_info

    r = cache_info(store)
    lines = [f"store: {r.root}  ({_size(r.bytes)} in {len(r.namespaces)} backbone namespaces)"]
    # columns as wide as their longest value, so a long backbone name (timm:..., a run dir)
    # does not push its row out of line
    fw = max([len("fingerprint"), *(len(n.fingerprint) for n in r.namespaces)])
    bw = max([len("backbone"), *(len(n.backbone or "?") for n in r.namespaces)])
    if r.namespaces:
        lines.append(f"{'fingerprint':<{fw}} {'backbone':<{bw}} {'dim':>5} {'rows':>9} {'shards':>6} "
                     f"{'size':>9}  last used")
    for n in r.namespaces:
        lines.append(f"{n.fingerprint:<{fw}} {n.backbone or '?':<{bw}} {n.dim or '?':>5} {n.rows:>9} "
                     f"{n.shards:>6} {_size(n.bytes):>9}  {_ago(n.last_used)}")
        if n.quarantined:
            lines.append(f"  {n.quarantined} quarantined shard(s): `featx cache prune --quarantined --yes`")
        if n.problem:
            lines.append(f"  problem: {n.problem}")
    emit(r.to_dict(), as_json, lines)


@cache_cmd.command("prune")
@click.option("--older-than", type=Duration(), default=None, metavar="AGE",
              help="Backbones not used for AGE (e.g. 30d, 12h, 2w).")
@click.option("--backbone", "-b", default=None, metavar="NAME|FINGERPRINT",
              help="Every namespace of this backbone name, or the one with this fingerprint.")
@click.option("--quarantined", is_flag=True, help="The shards quarantined as damaged.")
@click.option("--yes", "-y", is_flag=True,
              help="Really remove. Without it nothing is removed: the list shows what would be.")
@store_option
@json_option
def prune_cmd(older_than, backbone, quarantined: bool, yes: bool, store, as_json: bool) -> None:
    """Remove cached embeddings (a dry run unless --yes); they are recomputed when needed."""
    from featx.cache import prune_cache

    if older_than is None and backbone is None and not quarantined:
        raise click.UsageError("say what to prune: --older-than AGE, --backbone NAME and/or --quarantined")
    r = prune_cache(store, older_than=older_than, backbone=backbone, quarantined=quarantined,
                    dry_run=not yes)
    verb = "would remove" if r.dry_run else "removed"
    lines = [f"{verb} {x.path}  ({x.backbone or '?'}, {_size(x.bytes)}; {x.why})" for x in r.removed]
    lines.append(f"{verb} {_size(r.bytes)} in {len(r.removed)} folder(s)" if r.removed else "nothing to prune")
    if r.dry_run and r.removed:
        lines.append("dry run: nothing was removed; add --yes to remove it")
    emit(r.to_dict(), as_json, lines)


@cache_cmd.command("verify")
@click.option("--backbone", "-b", default=None, metavar="NAME|FINGERPRINT",
              help="Check only this backbone's namespaces.")
@store_option
@quiet_option
@json_option
@click.pass_context
def verify_cmd(ctx: click.Context, backbone, store, quiet: bool, as_json: bool) -> None:
    """Read and check every shard; move damaged ones to quarantine/. Exit 1 if any was damaged."""
    from featx.cache import verify_cache

    with progress_bar(quiet or as_json) as p:
        r = verify_cache(store, backbone=backbone, progress=p)
    lines = [f"store: {r.root}"]
    for n in r.namespaces:
        if n.problem:
            lines.append(f"{n.fingerprint} ({n.backbone or '?'}): NOT CHECKED: {n.problem}")
            continue
        old = f", {n.unchecksummed} without checksums (written by an earlier featx)" if n.unchecksummed else ""
        lines.append(f"{n.fingerprint} ({n.backbone or '?'}): {n.shards_ok} shards ok ({n.rows_ok} rows)"
                     f"{old}, {len(n.quarantined)} quarantined")
        lines += [f"  quarantined {s}: {why}" for s, why in n.quarantined]
    if r.temporaries_removed:
        lines.append(f"removed {r.temporaries_removed} stale temporary file(s) of killed runs")
    lines.append("ok" if r.ok else "damage found: quarantined shards are recomputed by the next run that needs them")
    emit(r.to_dict(), as_json, lines)
    if not r.ok:
        ctx.exit(1)
