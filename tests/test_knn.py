import pytest
import torch
import torch.nn.functional as F

from fastssl.eval import knn_accuracy, knn_predict


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
