"""Local losses of intra-model collaboration (paper 004, sections III-B and III-C).

Both read a dropout graph's *local* features (``graphs.dropout``: each point's layer rerun on its
detached input), so their gradients train the objective's own module and that one layer only.

- L_mid (eqs. 5-7): a :class:`LocalClassifier` per point predicts the class from the feature;
  :func:`mid_losses` gives each point's hard and soft terms.
- Pull-push (eqs. 8-9): a projection (one 1x1 convolution) per point; :func:`similarity` of the
  batch's channel standard deviations is pulled towards the labels' and pushed away from the
  input's, :func:`pull_push_losses`.

Both take integer labels ``[B]`` or soft targets ``[B, C]`` (mixup, cutmix, label smoothing):
L_mid's hard term is then the soft CE, pull-push's S(y) the similarity of the target vectors
themselves (a one-hot target gives the label's value exactly in both).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

POOLED = 4  # the local classifier's max pooling output (POOLED x POOLED), see LocalClassifier


class LocalClassifier(nn.Sequential):
    """Max pooling, 3x3 convolution (+ ReLU), fully connected: ``[B, C, H, W] -> [B, classes]``.

    The paper names the three layers but not their sizes. The pooling is adaptive, to 4 x 4, so
    the fully connected layer's size does not grow with the image (as in Local Error Signals,
    which the paper cites); the convolution keeps the channel count.
    """

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__(nn.AdaptiveMaxPool2d(POOLED),
                         nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(channels * POOLED * POOLED, num_classes))


def mid_losses(local_logits: Sequence[Tensor], output_logits: Tensor, labels: Tensor,
               temperature: float) -> tuple[Tensor, Tensor]:
    """Hard and soft terms of L_mid per point, ``[n]`` each (eqs. 5-6).

    ``local_logits``: the n points' local predictions ``[B, C]``, shallowest first;
    ``output_logits``: the network's prediction ``[B, C]``, the top layer N. Point i's target is
    ``q_i = softmax(mean(z_i, ..., z_n, z_out) / T)``, detached: the mean of the predictions of
    that layer and every layer above it (eq. 6 writes the mean's count as N - i). As eq. 5 does,
    the hard term takes the softmax at temperature T too; neither term is scaled by T^2.
    ``labels``: ``[B]``, or soft targets ``[B, C]`` for the hard term ``-sum_c t_c log p_c``.
    """
    t = temperature
    stacked = torch.stack([z.float() for z in local_logits] + [output_logits.float()])
    with torch.no_grad():
        above = stacked.flip(0).cumsum(0).flip(0)[:-1]  # sum over j >= i, for every point i
        counts = torch.arange(len(local_logits) + 1, 1, -1, device=stacked.device)
        targets = torch.softmax(above / counts.view(-1, 1, 1) / t, dim=-1)
    log_p = torch.log_softmax(stacked[:-1] / t, dim=-1)
    if labels.is_floating_point():
        hard = -(log_p * labels).sum(-1).mean(-1)
    else:
        hard = -log_p.gather(-1, labels.view(1, -1, 1).expand(len(local_logits), -1, 1)) \
            .squeeze(-1).mean(-1)
    soft = -(targets * log_p).sum(-1).mean(-1)
    return hard, soft


def similarity(vectors: Tensor) -> Tensor:
    """Eq. 8: cosine similarities ``[B, B]`` of the rows of ``vectors`` ``[B, D]`` after
    subtracting their mean over the batch (a zero row is similar to nothing)."""
    centred = vectors.float() - vectors.float().mean(0, keepdim=True)
    unit = F.normalize(centred, dim=1, eps=1e-12)
    return unit @ unit.T


def channel_std(feature: Tensor) -> Tensor:
    """Each image's per-channel standard deviation: ``[B, C, ...] -> [B, C]``."""
    return feature.float().flatten(2).std(-1, unbiased=False)


def depth_weights(ends: tuple[float, float], n: int) -> list[float]:
    """``n`` weights from ``ends[0]`` (shallowest point) to ``ends[1]`` (deepest), linearly;
    one point gets their mean."""
    if n == 1:
        return [(ends[0] + ends[1]) / 2]
    return [ends[0] + (ends[1] - ends[0]) * i / (n - 1) for i in range(n)]


def pull_push_losses(projected: Sequence[Tensor], images: Tensor, labels: Tensor,
                     num_classes: int, pull: Sequence[float], push: Sequence[float]) -> Tensor:
    """Eq. 9 per point, ``[n]``: ``pull_i ||S(g_i h_i) - S(y)||_F - push_i ||S(g_i h_i) -
    S(x)||_F`` with S of the channel standard deviations (of the images for x, of the one-hot
    labels themselves for y: ``labels`` ``[B]``, or soft targets ``[B, C]`` as they are; a
    smoothed target's constant eps / C cancels in S's centring)."""
    target = similarity(labels if labels.is_floating_point() else F.one_hot(labels, num_classes))
    source = similarity(channel_std(images))
    losses = []
    for g, a_pull, a_push in zip(projected, pull, push):
        s = similarity(channel_std(g))
        losses.append(a_pull * (s - target).norm() - a_push * (s - source).norm())
    return torch.stack(losses)
