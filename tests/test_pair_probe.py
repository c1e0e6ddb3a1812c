"""benchmarks/pair_probe.py: visual contrastive decoding's choice of next token."""

from __future__ import annotations

import math

import pytest
import torch


@pytest.fixture(scope="module")
def pair_probe(load_script):
    return load_script("benchmarks/pair_probe.py")


def _logits(*probs: float) -> torch.Tensor:
    return torch.tensor([math.log(p) for p in probs])


def test_contrast_prefers_what_the_image_adds_over_the_prior(pair_probe):
    # the image gives token 1 a little less than token 0; without the image, token 0 is far more likely
    real, null = _logits(0.5, 0.4, 0.1), _logits(0.9, 0.05, 0.05)
    assert int(real.argmax()) == 0
    assert int(pair_probe.contrast_argmax(real, null, 1.0, 0.1)) == 1
    # a small weight keeps the plain choice
    a = 0.05
    plain_wins = (1 + a) * math.log(0.5) - a * math.log(0.9) > (1 + a) * math.log(0.4) - a * math.log(0.05)
    assert plain_wins and int(pair_probe.contrast_argmax(real, null, a, 0.1)) == 0


def test_implausible_tokens_are_never_chosen(pair_probe):
    # token 2 is what the noised image rules out most, but the real image finds it implausible (0.01 < 0.1 x 0.6)
    real, null = _logits(0.6, 0.39, 0.01), _logits(0.6, 0.39999, 0.00001)
    assert int(pair_probe.contrast_argmax(real, null, 5.0, 0.1)) != 2
    assert int(pair_probe.contrast_argmax(real, null, 5.0, 0.01)) == 2


def test_batched_rows_are_chosen_apart(pair_probe):
    real = torch.stack([_logits(0.5, 0.4, 0.1), _logits(0.2, 0.7, 0.1)])
    null = torch.stack([_logits(0.9, 0.05, 0.05), _logits(0.2, 0.7, 0.1)])
    assert pair_probe.contrast_argmax(real, null, 1.0, 0.1).tolist() == [1, 1]
