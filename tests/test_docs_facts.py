"""Doc statements that must follow the code (issue 27, items 8 and 11)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def flat(path: str) -> str:
    return " ".join((ROOT / path).read_text(encoding="utf-8").split())


def _c(v: float) -> str:
    return f"{v:g}" if v >= 0.1 else f"{v:.0e}".replace("e-0", "e-")


def test_heads_md_states_each_heads_own_c_grid():
    from featx.heads.fit import C_GRIDS

    text = flat("docs/heads.md")
    for head, grid in C_GRIDS.items():
        assert f"`{head}` {_c(grid[0])} … {_c(grid[-1])}" in text, head
    assert "C ∈ {1e-4, …, 10}" not in text


def test_export_classifier_docs_put_normalisation_inside_the_graph():
    from featx.backbones.cards import get_card
    from featx.heads.onnx_classifier import preprocess_recipe

    assert "mean/std are applied inside the graph" in preprocess_recipe(get_card("efficientnet_lite0").preprocess)
    text = flat("docs/heads.md")
    assert "The normalisation (mean/std) and the NHWC -> NCHW transpose are **inside the graph**" in text


def test_readme_does_not_say_fp16_needs_a_gpu():
    text = flat("README.md")
    assert "| `featx export NAME --precision fp16` | `gpu` + `torch` |" not in text
    assert "it exports on a CPU" in text
