"""Drafters: the model's own one (the argmax of its noisy block, never [MASK]) and the interface another fits."""

from __future__ import annotations

import torch

from dlm.decoding.drafting import Drafter, DraftRequest, SelfDrafter


def test_self_drafter_takes_the_argmax_without_mask():
    logits = torch.tensor([[[0.0, 5.0, 1.0], [3.0, 0.0, 9.0]]])  # token 2 is [MASK]
    request = DraftRequest(rows=[0], first=torch.tensor([4]), length=2, logits=logits)
    assert SelfDrafter(mask_token_id=2).draft(request).tolist() == [[1, 0]]


def test_a_drafter_without_the_noisy_pass_gets_no_logits():
    class Fixed:
        noisy_pass = False

        def draft(self, request: DraftRequest) -> torch.Tensor:
            assert request.logits is None
            return torch.full((len(request.rows), request.length), 7)

    drafter: Drafter = Fixed()
    out = drafter.draft(DraftRequest(rows=[0, 3], first=torch.tensor([5, 9]), length=3, logits=None))
    assert out.tolist() == [[7, 7, 7]] * 2
