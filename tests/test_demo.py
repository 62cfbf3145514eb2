"""The demo's code path at a smaller size: sites sample at its training shape (counted from the modules), it
trains both models on the same batches, and the ONNX export agrees with PyTorch."""

import pytest

import fxbns.demo as demo


@pytest.mark.slow
def test_demo_samples_at_its_training_shape(tmp_path, capsys):
    # 32x32 at batch 128: the stem (128x64x16x16) and layer1 (128x64x8x8 = 2**19) sample under the fs preset
    res = demo.run(["--size", "32", "--batch", "128", "--epochs", "1", "--limit", "256",
                    "--onnx", str(tmp_path / "m.onnx")])
    assert res.ok and (tmp_path / "m.onnx").exists()
    expected = ["bn1", "layer1.0.bn1", "layer1.0.bn2", "layer1.1.bn1", "layer1.1.bn2"]
    assert sorted(res.sampled) == sorted(res.sampled_after) == expected
    out = capsys.readouterr().out
    assert "5 of 20 BatchNorms sample" in out and "5 sampled, 15 exact" in out
    assert set(res.accuracy) == set(res.step_ms) == {"exact BN", "fxbns fs"}


def test_sampled_sites_counts_from_the_modules(tiny_samples):
    import torch
    import torchvision

    import fxbns

    m = fxbns.transform(torchvision.models.resnet18(num_classes=10), "exact")
    assert demo.sampled_sites(m, torch.randn(4, 3, 32, 32)) == []  # exact statistics: nothing sampled
    m = fxbns.transform(torchvision.models.resnet18(num_classes=10), fxbns.Policy.from_preset("bs").set_min_elements(0))
    assert len(demo.sampled_sites(m, torch.randn(16, 3, 32, 32))) == 20
