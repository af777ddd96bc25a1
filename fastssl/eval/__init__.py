"""Evaluation of frozen backbones."""
from fastssl.eval.knn import extract_features, knn_accuracy, knn_predict, with_estimated_batch_norm
from fastssl.eval.linear import linear_probe, topk_accuracy

__all__ = ["extract_features", "knn_accuracy", "knn_predict", "linear_probe", "topk_accuracy",
           "with_estimated_batch_norm"]
