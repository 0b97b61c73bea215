"""Classification metrics in numpy alone (the serving environment has no scikit-learn).

Two classes: precision, recall and F1 of the positive class (index 1, ``dog``) and the ROC AUC of
its probability. More classes: macro averages over the classes seen and one-vs-rest macro AUC.
The same definitions as scikit-learn's (``zero_division=0``, ties in scores share their rank).
"""

from __future__ import annotations

import numpy as np


def roc_auc(positive: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve: the chance a random positive scores above a random negative."""
    positive = np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")  # undefined with one class present
    _, inverse, counts = np.unique(np.asarray(score), return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2  # 1-based; tied scores share a rank
    ranks = average_rank[inverse]
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _precision_recall_f1(y_true: np.ndarray, y_pred: np.ndarray, label: int) -> np.ndarray:
    tp = float(np.sum((y_pred == label) & (y_true == label)))
    predicted = float(np.sum(y_pred == label))
    actual = float(np.sum(y_true == label))
    precision = tp / predicted if predicted else 0.0
    recall = tp / actual if actual else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return np.array([precision, recall, f1])


def classification_metrics(y_true: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """accuracy, precision, recall, f1, roc_auc, n of (N,) labels against (N, C) probabilities."""
    y_true = np.asarray(y_true)
    probs = np.asarray(probs)
    y_pred = probs.argmax(axis=1)
    if probs.shape[1] == 2:
        precision, recall, f1 = _precision_recall_f1(y_true, y_pred, 1)
        auc = roc_auc(y_true == 1, probs[:, 1])
    else:
        labels = np.union1d(y_true, y_pred)
        precision, recall, f1 = np.mean(
            [_precision_recall_f1(y_true, y_pred, int(k)) for k in labels], axis=0
        )
        aucs = [roc_auc(y_true == k, probs[:, k]) for k in range(probs.shape[1])]
        auc = float(np.mean(aucs)) if len(np.unique(y_true)) > 1 else float("nan")
    return {
        "accuracy": float(np.mean(y_pred == y_true)),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "roc_auc": auc,
        "n": len(y_true),
    }
