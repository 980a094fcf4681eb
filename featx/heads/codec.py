"""A fitted head as data: the arrays of featx's own estimators plus a JSON description.

``encode`` turns the pipelines featx builds (scaler + logistic regression, linear or
RBF SVM with sigmoid calibration, SGD logistic regression, the fine-tuned linear
layer) into ``(spec, arrays)``: ``spec`` is plain JSON (kinds, scalar parameters,
class labels), ``arrays`` maps names to numeric numpy arrays. ``decode`` rebuilds
real scikit-learn estimators from them, so ``predict_proba`` and skl2onnx work as
on the originals.

Decoding constructs only the estimator kinds in ``KINDS`` and reads only numeric
arrays, checked for dtype, shape and finiteness before any estimator sees them
(the RBF SVM's arrays reach libsvm's C code, which trusts their sizes). A forged
head can at worst predict wrongly; it cannot run code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from featx.errors import FeatXError

__all__ = ["KINDS", "CodecError", "decode", "encode"]


class CodecError(FeatXError):
    """A pipeline featx cannot store as data, or a stored description that does not add up."""


Arrays = dict[str, np.ndarray]


# ---- encoding ----------------------------------------------------------------------------------

def encode(model: Any) -> tuple[dict, Arrays]:
    """``(spec, arrays)`` for a fitted Pipeline (or bare estimator) of the kinds in ``KINDS``."""
    from sklearn.pipeline import Pipeline

    arrays: Arrays = {}
    if isinstance(model, Pipeline):
        steps = [{"name": name, **_encode_est(est, f"s{i}", arrays)}
                 for i, (name, est) in enumerate(model.steps)]
        return {"pipeline": True, "steps": steps}, arrays
    return {"pipeline": False, "steps": [{"name": "clf", **_encode_est(model, "s0", arrays)}]}, arrays


def _encode_est(est: Any, key: str, arrays: Arrays) -> dict:
    kind = next((k for k, (cls_name, _, _) in KINDS.items() if type(est).__name__ == cls_name
                 and type(est).__module__.startswith("sklearn.")), None)
    if kind is None:
        raise CodecError(f"cannot store a {type(est).__module__}.{type(est).__name__} in a featx head "
                         f"file; featx stores {', '.join(sorted(v[0] for v in KINDS.values()))}")
    spec = KINDS[kind][1](est, key, arrays)
    return {"kind": kind, **spec}


def _put(arrays: Arrays, key: str, a) -> str:
    a = np.asarray(a)
    if a.dtype.kind == "f" and a.dtype not in (np.float32, np.float64):
        a = a.astype(np.float64)
    arrays[key] = np.ascontiguousarray(a)
    return key


def _classes(est) -> list:
    return [c.item() if hasattr(c, "item") else c for c in np.asarray(est.classes_).tolist()]


def _enc_scaler(est, key, arrays) -> dict:
    spec: dict = {"with_mean": bool(est.with_mean), "with_std": bool(est.with_std),
                  "n_features": int(est.n_features_in_)}
    if est.mean_ is not None:
        spec["mean"] = _put(arrays, f"{key}.mean", est.mean_)
    if est.scale_ is not None:
        spec["scale"] = _put(arrays, f"{key}.scale", est.scale_)
    return spec


def _enc_normalizer(est, key, arrays) -> dict:
    return {"norm": str(est.norm)}


def _enc_linear(est, key, arrays) -> dict:
    # kept in their own float width: a float32 model stays bit-identical
    spec = {"classes": _classes(est), "coef": _put(arrays, f"{key}.coef", est.coef_),
            "intercept": _put(arrays, f"{key}.intercept", np.atleast_1d(est.intercept_))}
    for p in ("C", "alpha", "loss"):  # for the record; decoding needs only ``loss`` of SGD
        if p in est.get_params():
            v = est.get_params()[p]
            spec[p] = v if isinstance(v, (str, int, float)) else str(v)
    return spec


def _enc_svc(est, key, arrays) -> dict:
    if est.kernel != "rbf" or getattr(est, "_sparse", False):
        raise CodecError(f"featx stores RBF SVMs trained on dense embeddings, not kernel={est.kernel!r}")
    return {
        "classes": _classes(est), "gamma": float(est._gamma), "C": float(est.C),
        "decision_function_shape": str(est.decision_function_shape),
        # libsvm's own signs (sklearn flips the public ones for two classes)
        "dual_coef": _put(arrays, f"{key}.dual_coef", est._dual_coef_.astype(np.float64)),
        "intercept": _put(arrays, f"{key}.intercept", est._intercept_.astype(np.float64)),
        "support_vectors": _put(arrays, f"{key}.support_vectors",
                                est.support_vectors_.astype(np.float64)),
        "support": _put(arrays, f"{key}.support", est.support_.astype(np.int32)),
        "n_support": _put(arrays, f"{key}.n_support", est._n_support.astype(np.int32)),
    }


def _enc_calibrated(est, key, arrays) -> dict:
    if est.method != "sigmoid":
        raise CodecError(f"featx stores sigmoid-calibrated classifiers, not method={est.method!r}")
    members = []
    for i, cc in enumerate(est.calibrated_classifiers_):
        sub = f"{key}.m{i}"
        members.append({
            "estimator": _encode_est(cc.estimator, f"{sub}.est", arrays),
            "a": _put(arrays, f"{sub}.a", np.array([c.a_ for c in cc.calibrators], np.float64)),
            "b": _put(arrays, f"{sub}.b", np.array([c.b_ for c in cc.calibrators], np.float64)),
        })
    return {"classes": _classes(est), "method": "sigmoid", "members": members,
            "n_features": int(est.n_features_in_)}


# ---- decoding ----------------------------------------------------------------------------------

def decode(spec: dict, arrays: Arrays, dim: int) -> Any:
    """Rebuild the estimator(s) described by ``spec``; ``dim`` is the embedding width.

    Raises CodecError on anything that does not add up (unknown kind, missing or
    non-numeric array, wrong shape, NaN), before an estimator is built from it.
    """
    from sklearn.pipeline import Pipeline

    steps = _field(spec, "steps", list)
    if not steps or len(steps) > 4:
        raise CodecError(f"a head has 1 to 4 steps, this one has {len(steps)}")
    built = []
    for s in steps:
        name = _field(s, "name", str)
        if not name.isidentifier():
            raise CodecError(f"bad step name {name!r}")
        built.append((name, _decode_est(s, arrays, dim)))
    if spec.get("pipeline", True):
        return Pipeline(built)
    if len(built) != 1:
        raise CodecError("a bare estimator head has exactly one step")
    return built[0][1]


def _decode_est(s: dict, arrays: Arrays, dim: int):
    kind = _field(s, "kind", str)
    if kind not in KINDS:
        raise CodecError(f"unknown estimator kind {kind!r}; featx heads use {', '.join(KINDS)}")
    return KINDS[kind][2](s, arrays, dim)


def _field(d: Any, name: str, typ: type | tuple[type, ...]):
    if not isinstance(d, dict) or name not in d:
        raise CodecError(f"the head description has no {name!r}")
    v = d[name]
    if not isinstance(v, typ) or (isinstance(v, bool) and typ is not bool):
        raise CodecError(f"{name!r} must be {getattr(typ, '__name__', typ)}, got {type(v).__name__}")
    return v


def _array(s: dict, name: str, arrays: Arrays, shape: tuple, integer: bool = False) -> np.ndarray:
    """The array ``s[name]`` names, checked against ``shape`` (None = any length)."""
    key = _field(s, name, str)
    if key not in arrays:
        raise CodecError(f"array {key!r} is missing from the head file")
    a = arrays[key]
    want = "iu" if integer else "fiu"
    if a.dtype.kind not in want:
        raise CodecError(f"array {key!r} has dtype {a.dtype}, expected {'integers' if integer else 'numbers'}")
    if a.ndim != len(shape) or any(w is not None and w != n for w, n in zip(shape, a.shape, strict=True)):
        raise CodecError(f"array {key!r} has shape {a.shape}, expected {shape}")
    if not integer and not np.isfinite(a).all():
        raise CodecError(f"array {key!r} holds NaN or inf")
    dtype = np.int32 if integer else np.float32 if a.dtype == np.float32 else np.float64
    return np.ascontiguousarray(a, dtype=dtype)


def _class_array(s: dict) -> np.ndarray:
    classes = _field(s, "classes", list)
    if len(classes) < 2 or len(set(map(str, classes))) != len(classes):
        raise CodecError(f"a head needs at least 2 distinct classes, got {classes[:5]}")
    if all(isinstance(c, int) and not isinstance(c, bool) for c in classes):
        return np.array(classes, dtype=np.int64)
    if all(isinstance(c, str) for c in classes):
        return np.array(classes, dtype=str)
    raise CodecError("class labels must be all integers or all strings")


def _dec_scaler(s, arrays, dim):
    from sklearn.preprocessing import StandardScaler

    sc = StandardScaler(with_mean=bool(s.get("with_mean", True)), with_std=bool(s.get("with_std", True)))
    sc.mean_ = _array(s, "mean", arrays, (dim,)) if "mean" in s else None
    sc.scale_ = _array(s, "scale", arrays, (dim,)) if "scale" in s else None
    if sc.scale_ is not None and not (sc.scale_ > 0).all():
        raise CodecError("scaler scale must be positive")
    sc.var_ = None if sc.scale_ is None else sc.scale_ ** 2
    sc.n_features_in_ = dim
    sc.n_samples_seen_ = 0
    return sc


def _dec_normalizer(s, arrays, dim):
    from sklearn.preprocessing import Normalizer

    norm = _field(s, "norm", str)
    if norm not in ("l1", "l2", "max"):
        raise CodecError(f"unknown norm {norm!r}")
    n = Normalizer(norm=norm)
    n.n_features_in_ = dim
    return n


def _linear(cls_name: str):
    def dec(s, arrays, dim):
        classes = _class_array(s)
        rows = 1 if len(classes) == 2 else len(classes)
        est = _sklearn_class(cls_name)()
        if cls_name == "SGDClassifier":
            loss = _field(s, "loss", str)
            if loss not in ("log_loss", "modified_huber"):
                raise CodecError(f"unknown SGD loss {loss!r}")
            est.set_params(loss=loss)
        est.classes_ = classes
        est.coef_ = _array(s, "coef", arrays, (rows, dim))
        est.intercept_ = _array(s, "intercept", arrays, (rows,))
        est.n_features_in_ = dim
        est.n_iter_ = np.array([0]) if cls_name == "LogisticRegression" else 0
        return est
    return dec


def _sklearn_class(name: str):
    from sklearn.linear_model import LogisticRegression, SGDClassifier
    from sklearn.svm import SVC, LinearSVC

    return {"LogisticRegression": LogisticRegression, "SGDClassifier": SGDClassifier,
            "LinearSVC": LinearSVC, "SVC": SVC}[name]


def _dec_svc(s, arrays, dim):
    from sklearn.svm import SVC

    classes = _class_array(s)
    k = len(classes)
    n_support = _array(s, "n_support", arrays, (k,), integer=True)
    if (n_support < 1).any():
        raise CodecError("every class of an SVM needs a support vector")
    n_sv = int(n_support.sum())
    sv = _array(s, "support_vectors", arrays, (n_sv, dim))
    dual = _array(s, "dual_coef", arrays, (k - 1, n_sv))
    intercept = _array(s, "intercept", arrays, (k * (k - 1) // 2,))
    support = _array(s, "support", arrays, (n_sv,), integer=True)
    gamma = _field(s, "gamma", (int, float))
    if not 0 < gamma < float("inf"):
        raise CodecError(f"gamma must be a positive number, got {gamma}")
    shape = _field(s, "decision_function_shape", str)
    if shape not in ("ovr", "ovo"):
        raise CodecError(f"unknown decision_function_shape {shape!r}")
    svm = SVC(kernel="rbf", gamma=float(gamma), C=float(s.get("C", 1.0)), decision_function_shape=shape)
    sign = -1.0 if k == 2 else 1.0  # sklearn's public attributes flip libsvm's signs for two classes
    svm.classes_, svm.support_, svm.support_vectors_ = classes, support, sv
    svm._n_support, svm._dual_coef_, svm._intercept_ = n_support, dual, intercept
    svm.dual_coef_, svm.intercept_ = sign * dual, sign * intercept
    svm._gamma, svm._sparse, svm.shape_fit_ = float(gamma), False, (n_sv, dim)
    svm._probA = svm._probB = np.empty(0, np.float64)
    svm.n_features_in_, svm.fit_status_ = dim, 0
    svm.class_weight_ = np.ones(k, np.float64)
    svm.n_iter_ = np.zeros(k * (k - 1) // 2, np.int32)
    return svm


def _dec_calibrated(s, arrays, dim):
    from sklearn.calibration import (
        CalibratedClassifierCV,
        _CalibratedClassifier,
        _SigmoidCalibration,
    )

    classes = _class_array(s)
    n_cal = 1 if len(classes) == 2 else len(classes)
    members = _field(s, "members", list)
    if not 1 <= len(members) <= 20:
        raise CodecError(f"a calibrated head has 1 to 20 members, got {len(members)}")
    built = []
    for m in members:
        est_spec = _field(m, "estimator", dict)
        if est_spec.get("kind") not in ("linear_svc", "svc", "logistic_regression"):
            raise CodecError(f"cannot calibrate a {est_spec.get('kind')!r}")
        est = _decode_est(est_spec, arrays, dim)
        if np.asarray(est.classes_).tolist() != classes.tolist():
            raise CodecError("a calibrated member's classes differ from the head's")
        a = _array(m, "a", arrays, (n_cal,))
        b = _array(m, "b", arrays, (n_cal,))
        cals = []
        for ai, bi in zip(a, b, strict=True):
            c = _SigmoidCalibration()
            c.a_, c.b_ = float(ai), float(bi)
            cals.append(c)
        built.append(_CalibratedClassifier(est, cals, classes=classes, method="sigmoid"))
    cal = CalibratedClassifierCV(built[0].estimator, method="sigmoid", ensemble=len(built) > 1)
    cal.calibrated_classifiers_ = built
    cal.classes_ = classes
    cal.n_features_in_ = dim
    return cal


#: kind -> (sklearn class name, encoder, decoder): the only estimators a head file can hold
KINDS: dict[str, tuple[str, Callable, Callable]] = {
    "standard_scaler": ("StandardScaler", _enc_scaler, _dec_scaler),
    "normalizer": ("Normalizer", _enc_normalizer, _dec_normalizer),
    "logistic_regression": ("LogisticRegression", _enc_linear, _linear("LogisticRegression")),
    "sgd_classifier": ("SGDClassifier", _enc_linear, _linear("SGDClassifier")),
    "linear_svc": ("LinearSVC", _enc_linear, _linear("LinearSVC")),
    "svc": ("SVC", _enc_svc, _dec_svc),
    "calibrated": ("CalibratedClassifierCV", _enc_calibrated, _dec_calibrated),
}
