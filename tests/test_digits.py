"""The quickstart's digits: read without scikit-learn's import, they are scikit-learn's, split as it splits."""

from __future__ import annotations

import pytest
import torch

from data_loader.digits import load_digits, load_digits_split


@pytest.mark.slow  # importing scikit-learn: 3 seconds
def test_the_digits_and_their_split_are_scikit_learns():
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    digits = sklearn_digits()
    images, labels = load_digits()
    assert torch.equal(images, torch.tensor(digits.images, dtype=torch.float32) / 16.0)
    assert torch.equal(labels, torch.tensor(digits.target, dtype=torch.int64))
    train, test = train_test_split(range(len(labels)), test_size=500, stratify=digits.target, random_state=0)
    split = load_digits_split()
    for part, indices in (("train", train), ("test", test)):
        assert torch.equal(split[part][0], images[indices]) and torch.equal(split[part][1], labels[indices])
