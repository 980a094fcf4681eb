"""One list of head kinds (featx.heads.kinds), checked in one place with one message."""

from __future__ import annotations

import re

import numpy as np
import pytest

from featx.cli import main
from featx.errors import FeatXError
from featx.estimators import FeatXClassifier
from featx.heads.fit import HEADS, fit_head, make_head
from featx.heads.kinds import HEAD_KINDS, IN_MEMORY_HEADS, STREAMING_HEADS


def test_the_cli_offers_exactly_the_kinds():
    head = next(p for p in main.commands["fit-head"].params if p.name == "head_kind")
    assert tuple(head.type.choices) == HEAD_KINDS
    assert HEADS == IN_MEMORY_HEADS and set(HEAD_KINDS) == set(IN_MEMORY_HEADS) | set(STREAMING_HEADS)


def test_the_estimator_documents_the_in_memory_kinds():
    doc = FeatXClassifier.__doc__
    listed = re.search(r"head : \{([^}]*)\}", doc).group(1)
    assert tuple(k.strip().strip('"') for k in listed.split(",")) == IN_MEMORY_HEADS


@pytest.mark.parametrize("call", [lambda: make_head("svm"), lambda: fit_head(np.zeros((4, 2)), list("aabb"), head="svm")])
def test_an_unknown_kind_is_one_message(call):
    with pytest.raises(FeatXError, match=r"unknown head 'svm'; expected one of logreg, linear-svm, svm-rbf$"):
        call()


def test_a_streaming_kind_in_memory_says_where_it_goes():
    with pytest.raises(FeatXError, match=r"sgd-logreg streams an embeddings table: featx.fit_table.fit_table"):
        fit_head(np.zeros((4, 2)), list("aabb"), head="sgd-logreg")


def test_fit_table_names_every_kind(tmp_path):
    from featx.fit_table import fit_table

    with pytest.raises(FeatXError, match="expected one of " + ", ".join(HEAD_KINDS)):
        fit_table(tmp_path / "none.featx.parquet", head="svm")
