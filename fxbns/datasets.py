"""Small real data sets that ship inside scikit-learn (no downloads): for the demo, examples and tests.

Needs scikit-learn (in the ``test`` extra).

>>> x = photo_crops(size=16, count=4)
>>> tuple(x.shape)
(4, 3, 16, 16)
"""

from __future__ import annotations

import torch


def _sklearn():
    try:
        import sklearn.datasets as d
    except ImportError:
        raise ImportError("fxbns.datasets needs scikit-learn: pip install 'fxbns[test]'") from None
    return d


def photo_crops(size: int = 32, count: int = 64, seed: int = 0) -> torch.Tensor:
    """Random crops (count, 3, size, size) of scikit-learn's two bundled photographs, in [0, 1]."""
    imgs = [torch.from_numpy(a.copy()).permute(2, 0, 1).float() / 255.0 for a in _sklearn().load_sample_images().images]
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        img = imgs[i % len(imgs)]
        h = int(torch.randint(0, img.shape[1] - size, (1,), generator=g))
        w = int(torch.randint(0, img.shape[2] - size, (1,), generator=g))
        out.append(img[:, h:h + size, w:w + size])
    return torch.stack(out)


def digits(size: int = 32, test_fraction: float = 0.25, seed: int = 0, channels: int = 3):
    """The bundled 8x8 handwritten digits (1797 images, 10 classes), upsampled to ``size``.

    Returns ``(x_train, y_train, x_test, y_test)``; images normalised to zero mean, unit std.
    """
    d = _sklearn().load_digits()
    x = torch.from_numpy(d.images).float().unsqueeze(1) / 16.0
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = ((x - x.mean()) / x.std()).expand(-1, channels, -1, -1).contiguous()
    y = torch.from_numpy(d.target).long()
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    n_test = int(len(y) * test_fraction)
    te, tr = perm[:n_test], perm[n_test:]
    return x[tr], y[tr], x[te], y[te]
