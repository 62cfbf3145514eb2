"""Distributed training: each rank draws its own samples, and sites can synchronize their statistics.

Under ``torch.distributed`` (``DistributedDataParallel``, ``torchrun``):

- **Seeds.** Every fxbns site draws with :func:`rank_seed` of its seed and the global rank, so ranks sample
  different elements; rank 0 (and a single process) draws what an undistributed run draws.
- **Synchronized sites** (:meth:`fxbns.Policy.set_sync`, and the model's own ``nn.SyncBatchNorm`` modules)
  normalise with the statistics of the union of the ranks' samples, exact or sampled, in one collective per layer
  in the forward and one in the backward (:mod:`fxbns.ops.sync`).  While ``torch.distributed`` is not initialised
  they run as unsynchronized sites, as ``nn.SyncBatchNorm`` does.

The same code runs on CPU with gloo and on CUDA with NCCL: the collectives are ``torch.distributed``'s, and nothing
reads a tensor value on the host.

>>> rank_seed(7, 0), rank_seed(7, 1)
(7, 104736)
>>> describe_group(None), payload_numel(64)
('world', {'forward': 129, 'backward': 128})
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

__all__ = ["initialized", "rank_seed", "describe_group", "check_member", "payload_numel"]

_M = 2147483647  # 2**31 - 1, the seed range of fxbns.sampling


def initialized() -> bool:
    """Whether ``torch.distributed`` is available and its default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def rank_seed(seed: int, rank: int) -> int:
    """The seed a site draws with on global rank ``rank``: ``seed`` on rank 0, a distinct one on every other rank.

    Args:
        seed: the site's seed (:func:`fxbns.modules.site_seed`).
        rank: the global rank.

    Returns:
        ``(seed + 104729 * rank) mod (2**31 - 1)``.
    """
    return (int(seed) + 104729 * int(rank)) % _M


def _non_member(process_group: Any) -> bool:
    """What ``torch.distributed.new_group`` returns on the ranks it leaves out (``GroupMember.NON_GROUP_MEMBER``)."""
    return isinstance(process_group, int) and process_group == dist.GroupMember.NON_GROUP_MEMBER


def describe_group(process_group: Any) -> str:
    """A process group in a few words, for reports: ``"world"`` for ``None`` (the default group), else its global
    ranks (while ``torch.distributed`` is initialised).

    Args:
        process_group: ``None`` or a ``torch.distributed.ProcessGroup``.

    Returns:
        e.g. ``"world"`` or ``"group(ranks 0, 1)"``.
    """
    if process_group is None:
        return "world"
    if _non_member(process_group):
        return "group(without this rank)"
    try:
        return "group(ranks " + ", ".join(map(str, dist.get_process_group_ranks(process_group))) + ")"
    except Exception:  # noqa: BLE001 - a group of a destroyed default group, or not a group at all
        return "group"


def check_member(process_group: Any, site: str = "") -> None:
    """Raise a clear ``RuntimeError`` unless this process is a member of ``process_group`` (``None``: WORLD).

    Args:
        process_group: the group a site synchronizes over.
        site: the site's name, for the message.

    Returns:
        None.
    """
    if process_group is None:
        return
    if _non_member(process_group) or dist.get_rank(process_group) < 0:
        where = f"fxbns site {site!r}" if site else "an fxbns site"
        raise RuntimeError(
            f"{where} synchronizes its statistics over a process group ({describe_group(process_group)}) that "
            f"does not contain this process (global rank {dist.get_rank()}). Every rank that runs the site must "
            f"be in its group: pass a group containing this rank to Policy.set_sync(process_group=...), or None "
            f"for the whole world")


def payload_numel(num_channels: int) -> dict[str, int]:
    """Values each rank sends per synchronized layer and step: ``2C + 1`` in the forward, ``2C`` in the backward.

    Args:
        num_channels: ``C``.

    Returns:
        ``{"forward": 2C + 1, "backward": 2C}``.
    """
    return {"forward": 2 * num_channels + 1, "backward": 2 * num_channels}
