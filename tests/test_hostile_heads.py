"""Hostile and unlucky head files: nothing featx reads as a head may run code.

Every forged file carries a real pickle payload whose ``__reduce__`` would create a
marker file; the tests plant it in the old (signed pickle) format and in the data
format, and check that the marker never appears.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from featx.cli import main
from featx.engines.files import embed_arrays
from featx.heads.fit import fit_head
from featx.heads.headfile import (
    MAGIC,
    HeadFileError,
    HeadKeyError,
    load_head,
    read_header,
    save_head,
)

from .helpers import make_image_folder, photos


class Evil:
    """Unpickling this creates ``path``: the stand-in for any code an attacker wants run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


@pytest.fixture(scope="module")
def fitted(lite0):
    """A real logreg head on real photo embeddings (cats vs things)."""
    p = photos()
    rng = np.random.default_rng(0)
    imgs, labels = [], []
    for label, names in {"cat": ["chelsea", "cat"], "thing": ["coffee", "rocket"]}.items():
        for i in range(6):
            a = p[names[i % 2]]
            y, x = rng.integers(0, 40, 2)
            imgs.append(np.ascontiguousarray(a[y:y + 250, x:x + 250]))
            labels.append(label)
    X = embed_arrays(imgs, lite0, device="cpu")
    return (*fit_head(X, labels, head="logreg", C=1.0), X)


def legacy_bytes(payload: bytes, lite0, key: bytes | None, classes=("cat", "thing")) -> bytes:
    """A head in featx's old format 1 (header + HMAC-signed pickle), as old featx wrote it."""
    header = {"format": 1, "classes": list(classes),
              "backbone": {"name": lite0.name, "fingerprint": lite0.fingerprint, "dim": lite0.dim,
                           "dir": str(lite0.onnx_path.parent), "dir_relative": None, "card": None},
              "preprocess": lite0.preprocess.to_dict(), "train": {}, "versions": {},
              "created": "2025-01-01T00:00:00Z",
              "payload_sha256": hashlib.sha256(payload).hexdigest(), "payload_bytes": len(payload)}
    header = json.loads(json.dumps(header))
    if key is not None:
        h = hmac.new(key, json.dumps(header, sort_keys=True).encode(), hashlib.sha256)
        h.update(payload)
        header["hmac_sha256"] = h.hexdigest()
    hb = json.dumps(header).encode()
    return MAGIC + f"{len(hb)}\n".encode() + hb + payload


def data_bytes(header: dict, payload: bytes) -> bytes:
    """A data-format head with the checksums recomputed, as a forger without any key can."""
    header = dict(header)
    header["payload_sha256"] = hashlib.sha256(payload).hexdigest()
    header["payload_bytes"] = len(payload)
    header.pop("content_sha256", None)
    h = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    h.update(payload)
    header["content_sha256"] = h.hexdigest()
    hb = json.dumps(header).encode()
    return MAGIC + f"{len(hb)}\n".encode() + hb + payload


@pytest.fixture
def config_home(tmp_path, monkeypatch) -> Path:
    """A private XDG_CONFIG_HOME and cache, no team key: the user's own key folder."""
    cfg = tmp_path / "config"
    (cfg / "featx").mkdir(parents=True)
    os.chmod(cfg / "featx", 0o700)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(cfg))
    monkeypatch.delenv("FEATX_HEAD_KEY", raising=False)
    monkeypatch.delenv("FEATX_TRUST_HEADS", raising=False)
    return cfg / "featx"


def write_key(folder: Path, text: str, mode: int = 0o600) -> Path:
    p = folder / "head.key"
    p.write_text(text)
    os.chmod(p, mode)
    return p


# ---- the data format ---------------------------------------------------------------------------

def test_data_head_holds_no_pickle_and_loads_with_no_key(fitted, lite0, tmp_path, monkeypatch):
    """Written on one machine, loaded on another with no key anywhere."""
    pipe, rep, X = fitted
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "machine-a"))
    path = save_head(tmp_path / "h.joblib", pipe, rep["classes"], lite0, rep)
    header, payload, _ = read_header(path)
    assert header["format"] == 2 and "hmac_sha256" not in header
    with zipfile.ZipFile(io.BytesIO(payload)) as z:
        assert all(i.compress_type == zipfile.ZIP_STORED and i.filename.endswith(".npy")
                   for i in z.infolist())
    with np.load(io.BytesIO(payload), allow_pickle=False) as npz:
        assert all(npz[k].dtype.kind in "fiu" for k in npz.files)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "machine-b"))
    monkeypatch.setenv("FEATX_HOME", str(tmp_path / "machine-b-cache"))
    h = load_head(path)
    np.testing.assert_array_equal(h.pipeline.predict_proba(X), pipe.predict_proba(X))
    assert not (tmp_path / "machine-b").exists()  # no key was made


def test_forged_data_heads_never_run_code(fitted, lite0, tmp_path):
    pipe, rep, _ = fitted
    marker = tmp_path / "pwned"
    good = save_head(tmp_path / "h.joblib", pipe, rep["classes"], lite0, rep)
    header, payload, _ = read_header(good)
    evil = pickle.dumps(Evil(marker))
    # 1. the payload replaced by a pickle, checksums recomputed
    (tmp_path / "a.joblib").write_bytes(data_bytes(header, evil))
    # 2. an .npz whose array is a pickled object array
    buf = io.BytesIO()
    np.save(buf, np.array([Evil(marker)], dtype=object), allow_pickle=True)
    with zipfile.ZipFile(io.BytesIO(payload)) as z:
        first = z.namelist()[0]
    obj = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(payload)) as src, zipfile.ZipFile(obj, "w") as dst:
        for name in src.namelist():
            dst.writestr(name, buf.getvalue() if name == first else src.read(name))
    (tmp_path / "b.joblib").write_bytes(data_bytes(header, obj.getvalue()))
    # 3. a model description naming something other than featx's estimator kinds
    h3 = json.loads(json.dumps(header))
    h3["model"]["steps"][1]["kind"] = "os.system"
    (tmp_path / "c.joblib").write_bytes(data_bytes(h3, payload))
    # 4. a deflated archive (a zip bomb would be one)
    z4 = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(payload)) as src, zipfile.ZipFile(z4, "w", zipfile.ZIP_DEFLATED) as dst:
        for name in src.namelist():
            dst.writestr(name, src.read(name))
    (tmp_path / "d.joblib").write_bytes(data_bytes(header, z4.getvalue()))
    for name, why in [("a", "arrays cannot be read"), ("b", "arrays cannot be read"),
                      ("c", "unknown estimator kind 'os.system'"), ("d", "arrays cannot be read")]:
        with pytest.raises(HeadFileError, match=why):
            load_head(tmp_path / f"{name}.joblib")
    assert not marker.exists()


def test_forged_svm_arrays_are_refused_before_libsvm(lite0, fitted, tmp_path):
    """libsvm trusts the sizes it is given: a lying n_support must never reach it."""
    _, rep, X = fitted
    pipe, rep = fit_head(X, rep["classes"] * 6, head="svm-rbf", C=1.0)
    good = save_head(tmp_path / "svm.joblib", pipe, rep["classes"], lite0, rep)
    header, payload, _ = read_header(good)
    with np.load(io.BytesIO(payload)) as npz:
        arrays = {k: npz[k] for k in npz.files}
    key = next(k for k in arrays if k.endswith("n_support"))
    arrays[key] = arrays[key] * 1000
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    (tmp_path / "bad.joblib").write_bytes(data_bytes(header, buf.getvalue()))
    with pytest.raises(HeadFileError, match=r"support_vectors.*has shape"):
        load_head(tmp_path / "bad.joblib")


def test_wrong_shapes_and_nan_are_damage_not_tracebacks(fitted, lite0, tmp_path):
    pipe, rep, _ = fitted
    header, payload, _ = read_header(save_head(tmp_path / "h.joblib", pipe, rep["classes"], lite0, rep))
    with np.load(io.BytesIO(payload)) as npz:
        arrays = {k: npz[k] for k in npz.files}
    for change, why in [(lambda a: a[:, :5], "has shape"), (lambda a: a * np.nan, "NaN")]:
        bad = dict(arrays)
        k = next(k for k in bad if k.endswith("coef"))
        bad[k] = change(bad[k])
        buf = io.BytesIO()
        np.savez(buf, **bad)
        (tmp_path / "x.joblib").write_bytes(data_bytes(header, buf.getvalue()))
        with pytest.raises(HeadFileError, match=why):
            load_head(tmp_path / "x.joblib")
    h = json.loads(json.dumps(header))
    h["classes"] = ["a", "b", "c"]  # the header's classes and the model's disagree
    (tmp_path / "y.joblib").write_bytes(data_bytes(h, payload))
    with pytest.raises(HeadFileError, match="2 probabilities for 3 classes"):
        load_head(tmp_path / "y.joblib")


# ---- legacy pickle heads and their key ----------------------------------------------------------

def test_legacy_heads_with_an_unsafe_key_never_run_code(lite0, tmp_path, config_home):
    """Old featx trusted any head.key: empty, planted by another user, or world-readable."""
    marker = tmp_path / "pwned"
    evil = pickle.dumps(Evil(marker))
    head = tmp_path / "evil.joblib"
    cases = [("", 0o600, "it is empty"),
             ("zz" * 32, 0o600, "not hexadecimal"),
             ("ab" * 10, 0o600, "expected 64 hex digits"),
             ("ab" * 32, 0o644, "group or others may read or write it")]
    for text, mode, why in cases:
        key = write_key(config_home, text, mode)
        head.write_bytes(legacy_bytes(evil, lite0, bytes.fromhex(text) if mode == 0o644 else b""))
        with pytest.raises(HeadKeyError, match=why):
            load_head(head)
        key.unlink()
    # a key planted by another user, or in a folder anyone can write to
    key = write_key(config_home, "cd" * 32)
    head.write_bytes(legacy_bytes(evil, lite0, bytes.fromhex("cd" * 32)))
    os.chown(key, 4242, -1)
    with pytest.raises(HeadKeyError, match="owned by uid 4242"):
        load_head(head)
    os.chown(key, os.geteuid(), -1)
    os.chmod(config_home, 0o777)
    with pytest.raises(HeadKeyError, match="others may write to its folder"):
        load_head(head)
    os.chmod(config_home, 0o700)
    key.unlink()
    key.symlink_to(tmp_path / "elsewhere.key")
    write_key(tmp_path, "cd" * 32).rename(tmp_path / "elsewhere.key")
    with pytest.raises(HeadKeyError, match="symlink"):
        load_head(head)
    assert not marker.exists()


def test_legacy_unsigned_or_foreign_heads_need_an_opt_in(lite0, tmp_path, config_home, monkeypatch):
    marker = tmp_path / "pwned"
    evil = pickle.dumps(Evil(marker))
    write_key(config_home, "ab" * 32)
    (tmp_path / "unsigned.joblib").write_bytes(legacy_bytes(evil, lite0, None))
    (tmp_path / "foreign.joblib").write_bytes(legacy_bytes(evil, lite0, b"someone else's key"))
    with pytest.raises(HeadFileError, match=r"unsigned head file.*FEATX_TRUST_HEADS=1"):
        load_head(tmp_path / "unsigned.joblib")
    with pytest.raises(HeadFileError, match="signature check failed"):
        load_head(tmp_path / "foreign.joblib")
    r = CliRunner().invoke(main, ["predict", str(tmp_path / "foreign.joblib"), str(tmp_path)])
    assert r.exit_code == 1 and "signature check failed" in r.output
    assert not marker.exists()


def test_legacy_signed_head_is_read_once_then_is_data(fitted, lite0, tmp_path, config_home,
                                                      monkeypatch):
    """A head old featx signed with this user's key still loads, and is rewritten as data."""
    pipe, rep, X = fitted
    write_key(config_home, "ab" * 32)
    path = tmp_path / "old.joblib"
    buf = io.BytesIO()
    import joblib

    joblib.dump(pipe, buf)
    path.write_bytes(legacy_bytes(buf.getvalue(), lite0, bytes.fromhex("ab" * 32), rep["classes"]))
    h = load_head(path)
    np.testing.assert_array_equal(h.pipeline.predict_proba(X), pipe.predict_proba(X))
    header, _, _ = read_header(path)
    assert header["format"] == 2 and header["upgraded_from"] == 1
    (config_home / "head.key").unlink()  # the key is no longer needed
    assert load_head(path).classes == rep["classes"]
    # the team key still checks heads signed with it
    monkeypatch.setenv("FEATX_HEAD_KEY", "team-secret")
    path.write_bytes(legacy_bytes(buf.getvalue(), lite0, b"team-secret", rep["classes"]))
    assert load_head(path).classes == rep["classes"]


def test_predict_works_where_no_key_can_be_made(fitted, lite0, tmp_path, monkeypatch):
    """Read-only or impossible config/cache folders: a data head needs no key, so no traceback."""
    pipe, rep, _ = fitted
    path = save_head(tmp_path / "h.joblib", pipe, rep["classes"], lite0, rep)
    folder = make_image_folder(tmp_path / "imgs", per_class=1)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(blocker / "config"))  # cannot be created, even by root
    r = CliRunner().invoke(main, ["predict", str(path), str(folder), "--store", str(tmp_path / "s"),
                                  "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["images"] == 2
    marker = tmp_path / "pwned"
    (tmp_path / "old.joblib").write_bytes(legacy_bytes(pickle.dumps(Evil(marker)), lite0, b"k"))
    monkeypatch.delenv("FEATX_HEAD_KEY", raising=False)
    monkeypatch.setenv("FEATX_HOME", str(blocker / "cache"))
    r = CliRunner().invoke(main, ["predict", str(tmp_path / "old.joblib"), str(folder),
                                  "--store", str(tmp_path / "s")])
    assert r.exit_code == 1 and "no head key found" in r.output and r.exception is not None
    assert isinstance(r.exception, SystemExit)
    assert not marker.exists()


def test_empty_key_in_the_cache_folder_signs_nothing(lite0, tmp_path, monkeypatch):
    """Old featx accepted an empty $FEATX_HOME/head.key as an empty key: anyone could sign."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("FEATX_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("FEATX_HEAD_KEY", raising=False)
    (tmp_path / "cache").mkdir(mode=0o700)
    write_key(tmp_path / "cache", "")
    marker = tmp_path / "pwned"
    (tmp_path / "evil.joblib").write_bytes(legacy_bytes(pickle.dumps(Evil(marker)), lite0, b""))
    with pytest.raises(HeadKeyError, match="it is empty"):
        load_head(tmp_path / "evil.joblib")
    assert not marker.exists()


# ---- round three (issue 23) --------------------------------------------------------------------

@pytest.mark.parametrize("value", ["false", "no", "off", "False", "maybe", " 0 "])
def test_trust_variable_opts_in_only_with_a_yes_word(lite0, tmp_path, config_home, monkeypatch, value):
    """FEATX_TRUST_HEADS=false (or off, or a typo) once ran a forged legacy head's pickle."""
    marker = tmp_path / "pwned"
    (tmp_path / "unsigned.joblib").write_bytes(legacy_bytes(pickle.dumps(Evil(marker)), lite0, None))
    monkeypatch.setenv("FEATX_TRUST_HEADS", value)
    words = value.strip().lower()
    match = "unsigned head file" if words in ("false", "no", "0") else r"FEATX_TRUST_HEADS='.*' is not understood.*1, true or yes"
    with pytest.raises(HeadFileError, match=match):
        load_head(tmp_path / "unsigned.joblib")
    r = CliRunner().invoke(main, ["predict", str(tmp_path / "unsigned.joblib"), str(tmp_path)])
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit) and "Traceback" not in r.output
    assert not marker.exists()


@pytest.mark.parametrize("value", ["1", "true", "YES"])
def test_trust_variable_yes_words_load_a_legacy_head(fitted, lite0, tmp_path, config_home, monkeypatch,
                                                     value):
    import joblib

    pipe, rep, X = fitted
    buf = io.BytesIO()
    joblib.dump(pipe, buf)
    path = tmp_path / "old.joblib"
    path.write_bytes(legacy_bytes(buf.getvalue(), lite0, None, rep["classes"]))
    monkeypatch.setenv("FEATX_TRUST_HEADS", value)
    np.testing.assert_array_equal(load_head(path).pipeline.predict_proba(X), pipe.predict_proba(X))


def test_legacy_head_with_no_key_anywhere_says_how_to_opt_in(lite0, tmp_path, config_home, monkeypatch):
    monkeypatch.setenv("FEATX_HOME", str(tmp_path / "cache"))
    marker = tmp_path / "pwned"
    (tmp_path / "signed.joblib").write_bytes(legacy_bytes(pickle.dumps(Evil(marker)), lite0, b"k"))
    with pytest.raises(HeadKeyError, match=r"no head key found.*FEATX_TRUST_HEADS=1"):
        load_head(tmp_path / "signed.joblib")
    assert not marker.exists()


def test_huge_declared_array_shape_is_damage_not_memory_error(fitted, lite0, tmp_path):
    """An array header claiming 2**40 elements: refused before numpy tries to allocate it."""
    pipe, rep, _ = fitted
    good = save_head(tmp_path / "h.joblib", pipe, rep["classes"], lite0, rep)
    header, payload, _ = read_header(good)
    buf = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(payload)) as z, zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as out:
        for info in z.infolist():
            data = z.read(info)
            if info.filename == z.infolist()[0].filename:
                npy = io.BytesIO()
                np.lib.format.write_array_header_1_0(
                    npy, {"descr": "<f8", "fortran_order": False, "shape": (2**40,)})
                data = npy.getvalue() + b"\0" * 64
            out.writestr(info.filename, data)
    forged = tmp_path / "forged.joblib"
    forged.write_bytes(data_bytes(header, buf.getvalue()))
    with pytest.raises(HeadFileError, match=r"declares shape \(1099511627776,\)"):
        load_head(forged)
