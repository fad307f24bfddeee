"""PS3 losses: SigLIP sigmoid loss (by hand, behaviour, 2-rank gloo parity) and the selection BCE."""

from __future__ import annotations

import math
import socket
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F  # noqa: N812 (the usual torch alias)

from ps3_engine.training.ps3.losses import PS3Loss, ps3_loss, selection_bce, siglip_loss

WORLD_SIZE = 2
BATCH = 6
DIM = 8


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(BATCH, DIM, generator=generator), dim=-1)
    texts = F.normalize(images + 0.5 * torch.randn(BATCH, DIM, generator=generator), dim=-1)
    return images, texts, torch.tensor(10.0), torch.tensor(-5.0)


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_siglip_loss_matches_a_hand_computed_case():
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    texts = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    scale, bias = torch.tensor(2.0), torch.tensor(-1.0)
    # logits = 2 * <img_i, txt_j> - 1: [[0.2, -1], [0.6, 1]]; positives on the diagonal, negated elsewhere.
    image0 = _log_sigmoid(0.2) + _log_sigmoid(1.0)
    image1 = _log_sigmoid(-0.6) + _log_sigmoid(1.0)
    expected = -(image0 + image1) / 2
    assert siglip_loss(images, texts, scale, bias).item() == pytest.approx(expected, rel=1e-6)


def test_siglip_loss_decreases_when_matched_pairs_get_closer():
    images, texts, scale, bias = _batch()
    closer = F.normalize(texts + 2.0 * images, dim=-1)
    assert siglip_loss(images, closer, scale, bias) < siglip_loss(images, texts, scale, bias)


def test_siglip_loss_rejects_mismatched_batches():
    with pytest.raises(ValueError, match="differ"):
        siglip_loss(torch.zeros(2, 4), torch.zeros(3, 4), torch.tensor(1.0), torch.tensor(0.0))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_worker(rank: int, port: int, out_dir: str) -> None:
    """One rank of the parity test: half of the fixed batch, loss and gradients saved for the parent."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    try:
        images, texts, scale, bias = _batch()
        half = BATCH // WORLD_SIZE
        rows = slice(rank * half, (rank + 1) * half)
        leaves = [t.clone().requires_grad_(True) for t in (images[rows], texts[rows], scale, bias)]
        loss = siglip_loss(*leaves)
        loss.backward()
        torch.save({"loss": loss.detach(), "grads": [t.grad for t in leaves]}, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()  # rank 0 hosts the TCP store: nobody leaves while the other still needs it
    finally:
        dist.destroy_process_group()


def test_siglip_loss_across_two_gloo_ranks_matches_the_full_batch(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_rank_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE)]

    leaves = [t.clone().requires_grad_(True) for t in _batch()]
    full = siglip_loss(*leaves)
    full.backward()
    # Convention: mean of the per-rank losses == full loss; summed gradients == world size x full gradient.
    assert torch.stack([r["loss"] for r in ranks]).mean().item() == pytest.approx(full.item(), rel=1e-5)
    image_grad = torch.cat([r["grads"][0] for r in ranks])
    text_grad = torch.cat([r["grads"][1] for r in ranks])
    torch.testing.assert_close(image_grad, WORLD_SIZE * leaves[0].grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(text_grad, WORLD_SIZE * leaves[1].grad, rtol=1e-5, atol=1e-6)
    for index in (2, 3):  # logit scale and bias: summed over ranks
        summed = sum(r["grads"][index] for r in ranks)
        torch.testing.assert_close(summed, WORLD_SIZE * leaves[index].grad, rtol=1e-5, atol=1e-6)


def test_selection_bce_ignores_global_samples():
    targets = [torch.tensor([[[1.0, 0.0]], [[0.0, 0.0]]]), torch.tensor([[[1.0, 0.0, 0.0, 1.0]], [[1.0] * 4]])]
    probs = [torch.full((2, 1, 2), 0.7), torch.full((2, 1, 4), 0.7)]
    local = torch.tensor([True, False])
    # Sample 1 is global: changing its probabilities must not change the loss.
    probs_changed = [p.clone() for p in probs]
    for p in probs_changed:
        p[1] = 0.01
    loss = selection_bce(probs, targets, local)
    assert loss.item() == pytest.approx(selection_bce(probs_changed, targets, local).item())
    expected = -(math.log(0.7) + math.log(0.3)) / 2  # both scales: half the cells inside the box
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_selection_bce_is_an_attached_zero_without_local_samples():
    probs = [torch.full((2, 3, 3), 0.5, requires_grad=True)]
    loss = selection_bce(probs, [torch.ones(2, 3, 3)], torch.tensor([False, False]))
    loss.backward()
    assert loss.item() == 0.0
    assert probs[0].grad is not None and torch.count_nonzero(probs[0].grad) == 0


def test_ps3_loss_combines_the_terms():
    images, texts, scale, bias = _batch()
    is_global = torch.tensor([True, False, False, True, False, False])
    gt = [(torch.rand(BATCH, 3, 3, generator=torch.Generator().manual_seed(1)) > 0.5).float()]
    outputs = {
        "image_embeds": images,
        "text_embeds": texts,
        "logit_scale": scale,
        "logit_bias": bias,
        "topdown_probs": [torch.full((BATCH, 3, 3), 0.6)],
        "bottomup_probs": [torch.full((BATCH, 3, 3), 0.4)],
        "gt_targets": gt,
        "is_global": is_global,
    }
    losses = ps3_loss(outputs, prior_weight=0.5, posterior_weight=2.0)
    expected = losses["contrastive"] + 0.5 * losses["prior_bce"] + 2.0 * losses["posterior_bce"]
    torch.testing.assert_close(losses["total"], expected)
    torch.testing.assert_close(losses["contrastive"], siglip_loss(images, texts, scale, bias))
    torch.testing.assert_close(losses["prior_bce"], selection_bce(outputs["bottomup_probs"], gt, ~is_global))
    no_prompt = PS3Loss()({**outputs, "topdown_probs": None})
    assert no_prompt["posterior_bce"].item() == 0.0
    torch.testing.assert_close(no_prompt["total"], no_prompt["contrastive"] + no_prompt["prior_bce"])
