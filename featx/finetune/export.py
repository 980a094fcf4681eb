"""Export back: a trained network becomes a backbone directory, a featx head and a one-file classifier."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from featx.atomic import atomic_path
from featx.backbones.artifact import Backbone, load_export
from featx.backbones.cards import BackboneCard, Preprocess
from featx.errors import FeatXError
from featx.finetune.config import FinetuneConfig
from featx.finetune.data import LabelledFiles
from featx.finetune.runlog import write_json


def linear_as_logreg(W: np.ndarray, b: np.ndarray):
    """A fitted sklearn LogisticRegression whose predict_proba is softmax(X W^T + b).

    Classes are the codes 0..K-1 (featx head convention). Two classes become
    one logit z = l1 - l0, since sklearn's binary model is sigmoid(z).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline

    W = np.asarray(W, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    clf = LogisticRegression()
    clf.classes_ = np.arange(len(W))
    if len(W) == 2:
        clf.coef_, clf.intercept_ = (W[1] - W[0])[None, :], np.array([b[1] - b[0]])
    else:
        clf.coef_, clf.intercept_ = W, b
    clf.n_features_in_ = W.shape[1]
    clf.n_iter_ = np.array([0])
    return Pipeline([("clf", clf)])


def export_run(net, run_dir: Path, classes: list[str], history: list[dict], best_epoch: int,
               card: BackboneCard, cfg: FinetuneConfig, weights_sha: str,
               train_keys: list[str] | None = None) -> tuple[Backbone, Path]:
    """Write backbone/ (parity-checked ONNX, new fingerprint), head.featx and classifier.onnx.

    ``train_keys``, the training images' content keys, go into head.featx as
    fit-head's do, so ``featx evaluate`` on a folder that holds them says so.
    Returns the new backbone and the head file.
    """
    import torch

    from featx.backbones.export import write_export

    meta = {
        "name": f"{card.name}-ft-{run_dir.name}", "card": card.to_dict(), "card_digest": card.digest(),
        "weights": f"finetuned from {cfg.weights or card.weights}", "weights_sha256": weights_sha,
        "dim": net.head.in_features, "torch_version": torch.__version__,
        "finetune": {"run_dir": str(run_dir.resolve()), "unfreeze": cfg.unfreeze,
                     "best_epoch": best_epoch, "lp_init": cfg.lp_init, "classes": classes},
    }
    recipe = getattr(net, "recipe", None)
    if recipe is not None:
        meta["features"] = recipe.to_dict()
    backbone = load_export(write_export(net.features, card.preprocess, run_dir / "backbone", meta))
    W = net.head.weight.detach().numpy()
    b = net.head.bias.detach().numpy()
    pipe = linear_as_logreg(W, b)
    from featx.heads.headfile import HEAD_FILE, save_head

    best = next((h for h in history if h["epoch"] == best_epoch), {})
    head_path = save_head(run_dir / HEAD_FILE, pipe, classes, backbone, {
        "head": "finetuned-linear", "source": "featx finetune",
        "n_train": None if train_keys is None else len(train_keys),
        "best_epoch": best_epoch, "val_acc": best.get("val_acc"), "unfreeze": cfg.unfreeze},
        train_keys=train_keys)
    from featx.heads.headfile import load_head

    export_network_classifier(net, backbone, classes, run_dir,
                              load_head(head_path).meta.get("payload_sha256", ""))
    return backbone, head_path


def export_network_classifier(net, backbone: Backbone, classes: list[str], run_dir: Path,
                              head_sha256: str = "") -> Path:
    """A run's classifier.onnx: the fine-tuned torch network traced whole, parity-checked.

    uint8 NHWC pixels -> ``probabilities`` and ``label``, with the same ``featx.*``
    metadata (classes, preprocessing spec and recipe, fingerprint) as the file
    ``featx export-classifier`` writes (``featx.heads.onnx_classifier``), so the
    docs' "without featx" code runs on either. ``backbone`` is the run's exported
    backbone: its preprocessing and fingerprint go into the metadata.
    """
    import onnx
    import onnxruntime as ort
    import torch

    from featx.backbones.export import export_module, parity_images
    from featx.heads.onnx_classifier import add_label_output, set_classifier_metadata

    pre = backbone.preprocess
    model = torch.nn.Sequential(net, torch.nn.Softmax(dim=1)).eval()
    dest = run_dir / "classifier.onnx"
    with atomic_path(dest) as tmp:  # published only if the parity check passes
        export_module(model, pre, tmp, output_name="probabilities")
        proto = onnx.load(str(tmp))
        add_label_output(proto, "probabilities", classes)
        set_classifier_metadata(proto, backbone, classes, head_sha256)
        proto.graph.name = f"featx_classifier_{backbone.name}"
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
        x = parity_images(pre)
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        sess = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        got, labels = sess.run(["probabilities", "label"], {"pixels": x})
        diff = float(np.abs(got - ref).max())
        if diff > 1e-4:
            raise FeatXError(f"classifier.onnx disagrees with torch (max prob diff {diff:.3g})")
        if [str(v) for v in labels] != [classes[j] for j in got.argmax(1)]:
            raise FeatXError("classifier.onnx: its label output is not the argmax of its probabilities")
    write_json(run_dir / "classifier.json", {"classes": classes, "preprocess": pre.to_dict(),
                                              "input": {"name": "pixels", "dtype": "uint8", "layout": "NHWC"},
                                              "outputs": ["probabilities", "label"],
                                              "backbone_fingerprint": backbone.fingerprint,
                                              "parity_max_abs_diff": diff})
    return dest


def predict_files(net, paths: list[str], pre: Preprocess, n_classes: int, batch_size: int = 64,
                  device: str = "cpu") -> np.ndarray:
    """Softmax of ``net`` over image files (centre crop); unreadable files give NaN rows."""
    import torch

    from featx.finetune.data import ImageDataset
    from featx.finetune.loop import autocast, torch_device

    dev = torch_device(device)
    net = net.to(dev).eval()
    ds = ImageDataset(LabelledFiles(list(paths), np.zeros(len(paths), np.int64), ["_"] * n_classes),
                      pre, train=False)
    out = np.full((len(paths), n_classes), np.nan, np.float32)
    with torch.no_grad():
        for i in range(0, len(paths), batch_size):
            items = [(j, ds[j]) for j in range(i, min(i + batch_size, len(paths)))]
            ok = [(j, it[0]) for j, it in items if it is not None]
            if not ok:
                continue
            x = torch.from_numpy(np.stack([a for _, a in ok])).to(dev)
            with autocast(dev):
                p = torch.softmax(net(x).float(), dim=1).cpu().numpy()
            out[[j for j, _ in ok]] = p
    return out
