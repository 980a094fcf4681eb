"""Error texts that tell the truth about what was asked and what to do next (issue 27, item 12)."""

from __future__ import annotations

import pytest

# Ray's own error when `ray.init(address="auto")` finds no cluster (Ray 2.x)
RAY_NO_CLUSTER = ("Could not find any running Ray instance. Please specify the one to connect to by "
                  "setting `--address` flag or `RAY_ADDRESS` environment variable.")


def test_no_ray_cluster_with_address_auto_does_not_advise_address_auto():
    from featx.engines.ray import connect_advice

    msg = connect_advice("auto", ConnectionError(RAY_NO_CLUSTER))
    assert msg.startswith("no running Ray cluster found from this machine (--address auto): "
                          "Could not find any running Ray instance.")
    assert "pass --address auto" not in msg and "specify the one to connect to" not in msg
    assert "ray start --head" in msg and "leave --address out" in msg
    other = connect_advice("10.0.0.5:6379", ConnectionError("timed out"))
    assert "ray status --address 10.0.0.5:6379" in other and "--address auto" not in other


def test_cuda_without_a_gpu_names_the_torch_build_it_has():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU torch can use")
    from featx.errors import DeviceError
    from featx.finetune.loop import torch_device

    with pytest.raises(DeviceError) as e:
        torch_device("cuda")
    msg = str(e.value)
    if torch.version.cuda is not None:  # a CUDA build without a GPU: installing one is no advice
        assert f"is a CUDA {torch.version.cuda} build, but it sees no GPU" in msg
        assert "install a CUDA build" not in msg
    else:
        assert "is a CPU-only build" in msg
    assert "--device cpu" in msg


def test_an_offline_timm_export_says_so_at_once():
    """The hub client retries a failed lookup for 25-50 s; featx asks the host once, briefly."""
    import time

    pytest.importorskip("timm")
    from huggingface_hub import constants

    from featx.backbones.cards import get_card
    from featx.backbones.cards.weights import unreachable, weights_file
    from featx.errors import FeatXError

    if unreachable(constants.ENDPOINT) is None:
        pytest.skip("the Hugging Face hub is reachable from here (or a proxy is configured)")
    card = get_card("timm:resnet10t")
    if card.weights_source.local_file() is not None:
        pytest.skip("these weights are cached here")
    t = time.perf_counter()
    with pytest.raises(FeatXError, match=r"not on this machine and .* cannot be reached .*--weights PATH"):
        weights_file(card.weights_source, card.name)
    assert time.perf_counter() - t < 10
