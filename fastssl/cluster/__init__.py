"""Clustering for DeepCluster and for analysis: k-means, PCA whitening and NMI, in torch on any device.

DeepCluster's use, every epoch (features of the whole training set, then pseudo-labels):

>>> import torch
>>> import torch.nn.functional as F
>>> from fastssl.cluster import kmeans, nmi, pca_whiten
>>> features = torch.randn(500, 64)
>>> x = F.normalize(pca_whiten(features, dim=16), dim=1)
>>> result = kmeans(x, k=10, iterations=20, restarts=2, seed=0)
>>> result.centroids.shape, result.assignments.shape
(torch.Size([10, 16]), torch.Size([500]))
>>> nmi(result.assignments, result.assignments)
1.0
"""
from fastssl.cluster.kmeans import KMeansResult, initial_centroids, kmeans
from fastssl.cluster.metrics import nmi
from fastssl.cluster.pca import pca_whiten

__all__ = ["KMeansResult", "kmeans", "initial_centroids", "pca_whiten", "nmi"]
