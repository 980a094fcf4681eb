"""``audit.html``: the findings with thumbnails, and a per-image correction picker.

One self-contained page (thumbnails inlined as small JPEG data URIs, no server, no
network): each finding has a picker (keep, one of the classes, or drop); the
"download relabel.csv" button writes the choices in the browser as the
``path,action,label`` file that ``featx fit-head --relabel`` reads. Every string from
the data (paths, labels) is HTML-escaped; the CSV is built by the page's script with
RFC 4180 quoting.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence

from featx.embed.scan import display_path, output_path
from featx.error_analysis import thumbnail

__all__ = ["THUMB", "render_page"]

THUMB = 96
#: findings shown per section (the CSV files list them all)
SHOW = {"label": 200, "pairs": 100, "outliers": 60}

_SCRIPT = r"""
const pickers = () => document.querySelectorAll('select.fix');
function sync(src) {
  pickers().forEach(s => { if (s.dataset.path === src.dataset.path) s.value = src.value; });
  const n = new Set([...pickers()].filter(s => s.value).map(s => s.dataset.path)).size;
  document.getElementById('count').textContent = n + ' image(s) chosen';
}
function cell(v) { return /[",\r\n]/.test(v) || /^\s|\s$/.test(v) ? '"' + v.replace(/"/g, '""') + '"' : v; }
function relabelCsv() {
  const chosen = new Map();
  pickers().forEach(s => { if (s.value) chosen.set(s.dataset.path, s.value); });
  let out = 'path,action,label\r\n';
  for (const [path, v] of chosen) {
    out += v === 'drop' ? cell(path) + ',drop,\r\n' : cell(path) + ',relabel,' + cell(v.slice(8)) + '\r\n';
  }
  return out;
}
function download() {
  const a = document.createElement('a');
  a.href = URL.createObjectURL(new Blob([relabelCsv()], {type: 'text/csv'}));
  a.download = 'relabel.csv';
  document.body.appendChild(a); a.click(); a.remove();
}
pickers().forEach(s => s.addEventListener('change', () => sync(s)));
document.getElementById('download').addEventListener('click', download);
"""

_STYLE = ("body{font-family:sans-serif;margin:2em} .grid{display:flex;flex-wrap:wrap;gap:8px}"
          " .card{border:1px solid #ccc;padding:4px;width:210px;font-size:12px;word-break:break-all}"
          " .pair{display:flex;gap:4px} .card img{height:96px;max-width:200px;display:block}"
          " .bar{position:sticky;top:0;background:#fff;padding:6px 0;border-bottom:1px solid #ccc}"
          " .note{color:#555}")


def _data_uri(path: str, cache: dict[str, str]) -> str:
    if path not in cache:
        img = thumbnail(path, THUMB)
        if img is None:
            cache[path] = ""
        else:
            from PIL import Image

            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="JPEG", quality=80)
            cache[path] = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    return cache[path]


def _picker(path: str, classes: Sequence[str]) -> str:
    e = html.escape
    opts = ["<option value=''>keep</option>"]
    opts += [f"<option value='relabel:{e(c, quote=True)}'>label: {e(c)}</option>" for c in classes]
    opts.append("<option value='drop'>drop</option>")
    return f"<select class=fix data-path='{e(path, quote=True)}'>{''.join(opts)}</select>"


def _card(path: str, full: str, lines: Sequence[str], classes: Sequence[str] | None,
          thumbs: dict[str, str]) -> str:
    e = html.escape
    uri = _data_uri(full, thumbs)
    img = f"<img src='{uri}' alt='{e(display_path(path), quote=True)}'>" if uri else "<p>(unreadable)</p>"
    text = "".join(f"<div>{e(x)}</div>" for x in lines)
    # relabel.csv names the file, as label_issues.csv does (fit-head --relabel takes either form)
    pick = _picker(output_path(full), classes) if classes is not None else "<div class=note>(test set)</div>"
    return f"<div class=card>{img}<div>{e(display_path(path))}</div>{text}{pick}</div>"


def _pair(p: dict, file_a: str, file_b: str, classes: Sequence[str], classes_b: Sequence[str] | None,
          thumbs: dict[str, str]) -> str:
    a = _card(p["path_a"], file_a, [f"label: {p['label_a']}"], classes, thumbs)
    b = _card(p["path_b"], file_b, [f"label: {p['label_b']}", f"cosine {p['similarity']:.4f}"], classes_b, thumbs)
    return f"<div class=pair>{a}{b}</div>"


def render_page(summary: dict, classes: Sequence[str], issues: list[dict], pairs: list[dict],
                leaks: list[dict], outs: list[dict], full: dict[str, str]) -> str:
    """The page's HTML. ``full[path]`` is the file of a table path (to read its thumbnail);
    ``issues``/``outs`` are the flagged rows of label_issues / outliers, ``pairs``/``leaks``
    the duplicate pairs within the table / across to the test table."""
    e = html.escape
    thumbs: dict[str, str] = {}
    th = summary.get("threshold") or {}
    parts = [f"<h1>featx audit: {e(str(summary.get('table', '')))}</h1>",
             f"<p>{summary.get('rows')} images, {len(classes)} classes. Label issues: "
             f"{summary.get('label_issues')}; near-duplicate pairs: {summary.get('duplicate_pairs')}"
             + (f"; test images with a near copy here: {summary.get('leaked')}" if leaks or summary.get("test")
                else "")
             + f"; outliers: {summary.get('outliers')}. Near-duplicate threshold {th.get('value', 0):.4f} "
             f"({e(str(th.get('why', '')))}).</p>",
             "<div class=bar><button id=download>download relabel.csv</button> <span id=count>"
             "0 image(s) chosen</span> <span class=note>pick a label or drop per image, then "
             "<code>featx fit-head --relabel relabel.csv</code></span></div>"]

    def section(title: str, note: str, cards: list[str], more: int) -> None:
        parts.append(f"<h2>{e(title)}</h2><p class=note>{e(note)}</p><div class=grid>{''.join(cards)}</div>")
        if more > 0:
            parts.append(f"<p class=note>... {more} more in the CSV file</p>")

    cards = [_card(r["path"], full[r["path"]], [f"given: {r['given']}", f"suggested: {r['suggested']}",
                                                f"score {r['score']:.3f} (rank {r['rank']})"], classes, thumbs)
             for r in issues[:SHOW["label"]]]
    section("Label issues", "most likely wrong first (label_issues.csv)", cards, len(issues) - SHOW["label"])
    cards = [_pair(p, full[p["path_a"]], full[p["path_b"]], classes, classes, thumbs)
             for p in pairs[:SHOW["pairs"]]]
    section("Near duplicates in the table", "most similar first (duplicates.csv)", cards,
            len(pairs) - SHOW["pairs"])
    if leaks or summary.get("test"):
        cards = [_pair(p, full[p["path_a"]], p["file_b"], classes, None, thumbs) for p in leaks[:SHOW["pairs"]]]
        section("Near copies of test images", "table image (left) and test image (right), most similar first",
                cards, len(leaks) - SHOW["pairs"])
    cards = [_card(r["path"], full[r["path"]], [f"label: {r['label']}", f"distance {r['distance']:.3f}, "
                                                f"z {r['z']:.1f}"], classes, thumbs) for r in outs[:SHOW["outliers"]]]
    section("Outliers", "farthest from their nearest neighbours first (outliers.csv)", cards,
            len(outs) - SHOW["outliers"])
    return (f"<!doctype html><html><head><meta charset=utf-8><title>featx audit</title>"
            f"<style>{_STYLE}</style></head><body>{''.join(parts)}<script>{_SCRIPT}</script></body></html>")
