"""The k-NN accuracy behind the design-choice figures, on an example small enough to check by hand."""

import numpy as np

from models.build.choices import knn_accuracy


def test_knn_accuracy_votes_among_the_k_most_similar() -> None:
    memory = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [0.95, 0.05]], np.float32)
    memory_labels = np.array([0, 1, 2, 2, 1])
    queries = np.array([[1, 0.01], [0.02, 1]], np.float32)
    labels = np.array([1, 2])
    assert knn_accuracy(memory, memory_labels, queries, labels, 1) == 50.0  # the nearest of query 0 is class 0
    assert knn_accuracy(memory, memory_labels, queries, labels, 3) == 100.0  # two of its three are class 1
