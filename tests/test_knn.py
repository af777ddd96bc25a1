import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastssl.eval import knn_accuracy, knn_predict, with_estimated_batch_norm


def test_separable_clusters_are_classified_perfectly():
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(4, 16, generator=g), dim=1)
    labels = torch.arange(4).repeat_interleave(30)
    feats = F.normalize(centres[labels] + 0.05 * torch.randn(120, 16, generator=g), dim=1)
    val_labels = torch.arange(4).repeat(5)
    val = F.normalize(centres[val_labels] + 0.05 * torch.randn(20, 16, generator=g), dim=1)
    assert knn_accuracy(feats, labels, val, val_labels, k=10) == 100.0
    shuffled = labels[torch.randperm(120, generator=g)]
    assert knn_accuracy(feats, shuffled, val, val_labels, k=10) < 80.0


def test_weighted_vote_by_hand():
    # Query at angle 0; two neighbours of class 0 at sim 0.5 and one of class 1 at sim 0.9.
    train = torch.tensor([[0.5, 0.866], [0.5, -0.866], [0.9, 0.4359]])
    labels = torch.tensor([0, 0, 1])
    query = torch.tensor([[1.0, 0.0]])
    # t = 0.1: 2 * e^5 = 297 < e^9 = 8103 -> class 1; t = 1: 2 * e^0.5 = 3.30 > e^0.9 = 2.46 -> class 0
    assert knn_predict(train, labels, query, k=3, temperature=0.1).item() == 1
    assert knn_predict(train, labels, query, k=3, temperature=1.0).item() == 0
    assert knn_predict(train, labels, query, k=1, temperature=1.0).item() == 1


def test_k_larger_than_the_training_set_is_clamped():
    train = F.normalize(torch.randn(5, 3), dim=1)
    assert knn_predict(train, torch.zeros(5, dtype=torch.long), train, k=200).tolist() == [0] * 5
    with pytest.raises(ValueError, match="at least one"):
        knn_predict(train[:0], torch.zeros(0, dtype=torch.long), train)


def test_batch_norm_statistics_are_re_estimated_in_a_copy():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2))
    images = torch.rand(10, 3, 8, 8) * 3 + 1
    loader = [([images[:6]], None, None), ([images[6:]], None, None)]
    fitted = with_estimated_batch_norm(net, loader, lambda x: x)
    with torch.no_grad():
        first = net[0](images)
    batches = (first[:6], first[6:])
    # each batch's mean and (unbiased) variance per channel, averaged over the two batches
    mean = sum(b.mean((0, 2, 3)) for b in batches) / 2
    var = sum(b.transpose(0, 1).flatten(1).var(dim=1) for b in batches) / 2
    torch.testing.assert_close(fitted[1].running_mean, mean)
    torch.testing.assert_close(fitted[1].running_var, var)
    assert fitted[1].num_batches_tracked == 2 and not fitted.training
    with torch.no_grad():       # in eval mode the first layer now normalises these images
        normalised = fitted[1](fitted[0](images))
    assert normalised.mean().abs() < 0.05 and (normalised.var() - 1).abs() < 0.1
    # the original keeps its initial statistics, momentum and mode
    assert net[1].running_mean.eq(0).all() and net[1].running_var.eq(1).all()
    assert net[1].momentum == 0.1 and net.training
    only_first = with_estimated_batch_norm(net, loader, lambda x: x, max_images=6)
    torch.testing.assert_close(only_first[1].running_mean, batches[0].mean((0, 2, 3)))
