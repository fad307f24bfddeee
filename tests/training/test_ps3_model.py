"""PS3 model on the tiny config (CPU): budget, selection, low-res KV attention, pooling, gradients, loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F  # noqa: N812 (the usual torch alias)
from transformers import SiglipConfig, SiglipModel

from ps3_engine.training.ps3.config import PS3ModelConfig
from ps3_engine.training.ps3.model import PS3CLIP, PS3VisionModel, encode_image
from ps3_engine.training.ps3.selection import roll_over, round_plan, select_top_k, split_budget

BATCH = 3
SIZE = 224  # the tiny config's largest scale; grids 4 (low-res), 8 and 16


def _tiny(**changes) -> PS3ModelConfig:
    return PS3ModelConfig(**{**PS3ModelConfig.tiny().model_dump(), **changes})


def _model(seed: int = 0, **changes) -> PS3CLIP:
    torch.manual_seed(seed)
    return PS3CLIP.from_config(_tiny(**changes)).eval()


def _images(seed: int = 1) -> torch.Tensor:
    return torch.randn(BATCH, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _text(seed: int = 2) -> tuple[torch.Tensor]:
    ids = torch.randint(3, 512, (BATCH, 16), generator=torch.Generator().manual_seed(seed))
    return (ids,)


def _box_maps(x0: int, y0: int, x1: int, y1: int) -> torch.Tensor:
    maps = torch.zeros(BATCH, SIZE, SIZE)
    maps[:, y0:y1, x0:x1] = 1.0
    return maps


@pytest.fixture(scope="module")
def model() -> PS3CLIP:
    return _model()


@pytest.fixture(scope="module")
def vision(model: PS3CLIP) -> PS3VisionModel:
    return model.vision


# ---- budget --------------------------------------------------------------------------------------


def test_budget_split_follows_pixel_share_like_the_reference():
    assert split_budget(2560, [756, 1512]) == [512, 2048]
    assert split_budget(2560, [756, 1512, 3780]) == [85, 341, 2134]
    assert split_budget(48, [112, 224]) == [9, 39]


def test_leftover_rolls_to_the_next_scale_and_the_last_scale_drops_it():
    assert roll_over([80, 320], [64, 256]) == [64, 256]
    assert roll_over([5, 10], [3, 20]) == [3, 12]
    assert roll_over([1, 2, 3], [10, 10, 10]) == [1, 2, 3]


def test_select_top_k_skips_taken_patches():
    scores = [torch.arange(10.0).repeat(2, 1)]
    taken = [torch.zeros(2, 10, dtype=torch.bool)]
    taken[0][:, 7:] = True
    (index,) = select_top_k(scores, [3], taken)
    assert index.tolist() == [[4, 5, 6], [4, 5, 6]]


# ---- shapes, counts, uniqueness -------------------------------------------------------------------


def test_output_shapes_and_counts_per_scale_equal_the_budget_split(vision):
    out = vision(_images())
    assert out.low_res_tokens.shape == (BATCH, 16, 32)
    assert out.high_res_tokens.shape == (BATCH, 48, 32)
    assert out.pooled.shape == (BATCH, 32)
    assert [s.shape for s in out.selected] == [(BATCH, 9), (BATCH, 39)]
    assert [p.shape for p in out.bottomup_probs] == [(BATCH, 8, 8), (BATCH, 16, 16)]
    assert out.topdown_probs is None and out.gt_targets is None


def test_quota_above_a_scale_grid_rolls_over_within_one_round():
    vision = _model(max_select=340).vision  # split [68, 272]: the 8x8 grid has 64 patches
    out = vision(_images())
    assert [s.shape[1] for s in out.selected] == [64, 256]
    assert all(torch.equal(s, torch.arange(s.shape[1]).expand(BATCH, -1)) for s in out.selected)


@pytest.mark.parametrize("num_select", [None, 20, 150])
def test_selected_indices_are_unique_and_inside_the_grid(vision, num_select):
    out = encode_image(vision, _images(), num_select=num_select)
    assert sum(s.shape[1] for s in out.selected) == (num_select or 48)
    assert out.high_res_tokens.shape[1] == (num_select or 48)
    for index, grid in zip(out.selected, [8, 16], strict=True):
        assert int(index.min()) >= 0 and int(index.max()) < grid * grid
        for row in index:
            assert len(set(row.tolist())) == len(row)
            assert row.tolist() == sorted(row.tolist())


def test_zero_budget_gives_low_res_only(vision):
    out = encode_image(vision, _images(), num_select=0)
    assert out.high_res_tokens.shape == (BATCH, 0, 32)
    assert torch.equal(out.pooled, out.low_res_pooled)


# ---- selection -----------------------------------------------------------------------------------


def test_gt_patches_are_selected_first(vision):
    small = _box_maps(28, 56, 84, 112)  # 2x2 cells of the 8-grid, 4x4 of the 16-grid
    out = vision(_images(), gt_maps=small)
    first = F.interpolate(small[:, None], size=(8, 8), mode="area")
    for index, grid in zip(out.selected, [8, 16], strict=True):
        forced = F.interpolate(first, size=(grid, grid), mode="nearest")[:, 0].flatten(1) > 0
        chosen = torch.zeros_like(forced).scatter_(1, index, True)
        assert bool((chosen | ~forced).all()), "every GT patch fits the budget and must be selected"
    large = _box_maps(0, 0, 168, 168)  # 36 cells of the 8-grid > quota 9
    out = vision(_images(), gt_maps=large)
    for index, target in zip(out.selected, out.gt_targets, strict=True):
        assert bool((target.flatten(1).gather(1, index) > 0).all()), "budget smaller than the box: all inside"


def test_gt_targets_are_area_downsampled_and_thresholded(vision):
    maps = _box_maps(0, 0, 15, 15)  # touches 2x2 patches of the 16-grid, 1 of the 8-grid
    out = vision(_images(), gt_maps=maps)
    assert [int(t[0].sum()) for t in out.gt_targets] == [1, 4]
    assert out.gt_targets[0].dtype == torch.float32


def test_top_down_prompt_changes_the_selection(model, vision):
    images = _images()
    prompt = model.encode_text(*_text())
    bottom_up = vision(images)
    top_down = vision(images, prompt_embeds=prompt)
    assert not torch.allclose(top_down.topdown_probs[0], top_down.bottomup_probs[0])
    assert torch.equal(top_down.bottomup_probs[0], bottom_up.bottomup_probs[0])
    assert any(not torch.equal(a, b) for a, b in zip(top_down.selected, bottom_up.selected, strict=True))


def test_every_scale_uses_the_first_scale_map(vision):
    out = vision(_images())
    coarse, fine = out.bottomup_probs
    assert torch.equal(fine, coarse.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2))
    assert float(coarse.detach().min()) > 0 and float(coarse.detach().max()) < 1


# ---- text tower ----------------------------------------------------------------------------------


def test_text_tower_equals_siglip_text_model_called_without_a_mask(model):
    """The reference runs SigLIP's text tower on max-length padded ids with no mask, pooling the last
    position; ``encode_text`` must give exactly what ``SiglipTextModel`` gives when called that way."""
    from transformers import SiglipTextModel

    siglip_text = SiglipTextModel(model.text.config).eval()
    siglip_text.load_state_dict(model.text.state_dict())
    ids = torch.full((BATCH, 32), model.text.config.pad_token_id)
    lengths = [5, 12, 32]
    for row, length in enumerate(lengths):
        ids[row, :length] = torch.randint(3, 512, (length,), generator=torch.Generator().manual_seed(row))
    padding_mask = torch.arange(32) < torch.tensor(lengths)[:, None]
    with torch.no_grad():
        ours = model.encode_text(ids)
        theirs = siglip_text(input_ids=ids).pooler_output
        masked = siglip_text(input_ids=ids, attention_mask=padding_mask).pooler_output
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    # a padding mask would change the embedding of every padded caption (not the full-length one)
    cosine = F.cosine_similarity(masked, theirs, dim=-1)
    assert float(cosine[0]) < 0.99 and float(cosine[1]) < 0.99
    torch.testing.assert_close(masked[2], theirs[2])


def test_the_training_forward_uses_the_unmasked_text_embedding(model):
    ids = torch.full((BATCH, 32), model.text.config.pad_token_id)
    ids[:, :6] = _text()[0][:, :6]
    with torch.no_grad():
        outputs = model(images=_images(), input_ids=ids)
        expected = F.normalize(model.encode_text(ids), dim=-1)
    torch.testing.assert_close(outputs["text_embeds"], expected)


# ---- low-res KV cache ----------------------------------------------------------------------------


def test_low_res_pass_matches_siglip_vision_model(vision):
    images = _images()
    low_res = F.interpolate(images, size=(56, 56), mode="bicubic", align_corners=False)
    reference = vision.vit(pixel_values=low_res)
    out = vision(images, is_global=torch.ones(BATCH, dtype=torch.bool))
    torch.testing.assert_close(out.low_res_tokens, reference.last_hidden_state, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.pooled, reference.pooler_output, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.pooled, vision.pool(out.low_res_tokens))


def test_high_res_equals_a_joint_pass_where_only_high_res_queries_see_everything(vision):
    """Reference semantics: one sequence [low ; high] through the SigLIP layers with a mask that keeps
    low-res queries on low-res keys gives the low-res tokens unchanged and the high-res tokens of PS3."""
    images = _images()
    low = vision.forward_low_res(images)
    selected = select_top_k([torch.rand(BATCH, 64), torch.rand(BATCH, 256)], [5, 11])
    high_inputs = vision.embed_selected(images, selected)
    high = vision.forward_high_res(high_inputs, low.kv_cache)

    low_inputs = vision.vit.embeddings(F.interpolate(images, size=(56, 56), mode="bicubic", align_corners=False))
    joint = torch.cat([low_inputs, high_inputs], dim=1)
    mask = torch.zeros(1, 1, joint.shape[1], joint.shape[1])
    mask[..., :16, 16:] = float("-inf")
    hidden = joint
    for layer in vision.vit.encoder.layers:
        hidden = layer(hidden, attention_mask=mask)
    hidden = vision.vit.post_layernorm(hidden)
    torch.testing.assert_close(hidden[:, :16], low.tokens, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(hidden[:, 16:], high, rtol=1e-4, atol=1e-5)


def test_high_res_tokens_depend_on_low_res_kv(vision):
    images = _images()
    low = vision.forward_low_res(images)
    tokens = vision.embed_selected(images, select_top_k([torch.rand(BATCH, 64), torch.rand(BATCH, 256)], [4, 8]))
    base = vision.forward_high_res(tokens, low.kv_cache)
    for layer in (0, len(low.kv_cache) - 1):
        changed = list(low.kv_cache)
        keys, values = changed[layer]
        changed[layer] = (keys, values + 1.0)
        assert not torch.allclose(vision.forward_high_res(tokens, changed), base)


def test_low_res_tokens_do_not_depend_on_the_high_res_path():
    vision = _model().vision
    images = _images()
    a = vision(images, gt_maps=_box_maps(0, 0, 56, 56))
    b = vision(images, gt_maps=_box_maps(112, 112, 224, 224))
    with torch.no_grad():
        vision.pos_emb_residual[1].add_(1.0)
    c = vision(images, gt_maps=_box_maps(112, 112, 224, 224))
    assert torch.equal(a.low_res_tokens, b.low_res_tokens) and torch.equal(a.low_res_tokens, c.low_res_tokens)
    assert not torch.equal(b.high_res_tokens, c.high_res_tokens)


def test_position_residuals_start_at_zero(vision):
    assert len(vision.pos_emb_residual) == 2
    assert all(float(r.detach().abs().max()) == 0.0 for r in vision.pos_emb_residual)
    assert [r.shape for r in vision.pos_emb_residual] == [(64, 32), (256, 32)]
    table = vision.vit.embeddings.position_embedding.weight.reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    # timm's resample_abs_pos_embed, as in the reference: bicubic with antialias (a PIL-style kernel)
    resized = F.interpolate(table, size=(8, 8), mode="bicubic", align_corners=False, antialias=True)
    resized = resized[0].permute(1, 2, 0)
    torch.testing.assert_close(vision.scale_pos_embed(0), resized.reshape(64, 32))


def test_selected_patch_embedding_equals_the_conv(vision):
    images = _images()
    index = torch.tensor([[0, 5, 63]] * BATCH)
    tokens = vision.embed_selected(images, [index, torch.empty(BATCH, 0, dtype=torch.long)])
    pixels = F.interpolate(images, size=(112, 112), mode="bicubic", align_corners=False)
    conv = vision.vit.embeddings.patch_embedding(pixels).flatten(2).transpose(1, 2)
    expected = conv[:, [0, 5, 63]] + vision.scale_pos_embed(0)[[0, 5, 63]]
    torch.testing.assert_close(tokens, expected, rtol=1e-4, atol=1e-5)


# ---- pooling ---------------------------------------------------------------------------------------


def test_local_pool_uses_only_high_res_tokens_inside_the_box(vision):
    images, maps = _images(), _box_maps(0, 0, 28, 56)  # 2 cells of the 8-grid, 8 of the 16-grid
    out = vision(images, gt_maps=maps, is_global=torch.tensor([False, True, False]))
    inside = torch.cat([t.flatten(1).gather(1, i) for t, i in zip(out.gt_targets, out.selected, strict=True)], 1)
    for sample in (0, 2):
        tokens = out.high_res_tokens[sample : sample + 1, inside[sample] > 0]
        assert 0 < tokens.shape[1] < out.high_res_tokens.shape[1]
        torch.testing.assert_close(out.pooled[sample : sample + 1], vision.pool(tokens), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.pooled[1], out.low_res_pooled[1])


# ---- training ---------------------------------------------------------------------------------------


def _toy_loss(outputs: dict) -> torch.Tensor:
    sims = outputs["image_embeds"] @ outputs["text_embeds"].T * outputs["logit_scale"] + outputs["logit_bias"]
    labels = 2 * torch.eye(sims.shape[0]) - 1
    contrastive = -F.logsigmoid(labels * sims).mean()
    bce = sum(
        F.binary_cross_entropy(p, t)
        for probs in (outputs["topdown_probs"], outputs["bottomup_probs"])
        for p, t in zip(probs, outputs["gt_targets"], strict=True)
    )
    return contrastive + bce


def _train_batch() -> dict:
    (ids,) = _text()
    return {
        "images": _images(),
        "input_ids": ids,
        "gt_maps": _box_maps(20, 30, 150, 120),
        "is_global": torch.tensor([False, True, False]),
    }


def test_gradients_reach_selection_modules_vit_and_text():
    model = _model().train()
    _toy_loss(model(**_train_batch())).backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    for name in (
        "vision.selector.prompt_proj.fc1.weight",
        "vision.selector.prior_prompt",
        "vision.selector.selection_feature_proj.fc1.weight",
        "vision.selector.conv_branch.stem.0.weight",
        "vision.selector.conv_branch.blocks.0.fc1.weight",
        "vision.selector.prompt_proj_for_highres.weight",
        "vision.pos_emb_residual.1",
        "vision.vit.embeddings.patch_embedding.weight",
        "vision.vit.encoder.layers.0.self_attn.k_proj.weight",
        "vision.vit.encoder.layers.3.mlp.fc2.weight",
        "vision.vit.head.probe",
        "text.encoder.layers.0.self_attn.q_proj.weight",
        "logit_scale",
        "logit_bias",
    ):
        assert grads[name] is not None and float(grads[name].abs().sum()) > 0, name
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]


def test_a_few_optimizer_steps_lower_a_toy_loss():
    model = _model().train()
    batch = _train_batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(4):
        loss = _toy_loss(model(**batch))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    plain, checkpointed = _model().train(), _model().train()
    checkpointed.set_grad_checkpointing(True)
    losses = []
    for model in (plain, checkpointed):
        loss = _toy_loss(model(**_train_batch()))
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1])
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_bf16_autocast_forward_and_backward_give_fp32_embeddings():
    model = _model().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(**_train_batch())
    assert outputs["image_embeds"].dtype == outputs["text_embeds"].dtype == torch.float32
    loss = _toy_loss({**outputs, **{k: [p.float() for p in outputs[k]] for k in ("topdown_probs", "bottomup_probs")}})
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())


# ---- config and loading ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_siglip(tmp_path_factory) -> tuple[SiglipModel, Path]:
    """A tiny random SiglipModel saved with ``save_pretrained`` (what a SigLIP checkpoint folder holds)."""
    tiny = PS3ModelConfig.tiny()
    torch.manual_seed(5)
    siglip = SiglipModel(SiglipConfig(vision_config=tiny.vision, text_config=tiny.text))
    with torch.no_grad():
        siglip.logit_bias.fill_(-3.5)
    folder = tmp_path_factory.mktemp("siglip")
    siglip.save_pretrained(folder)
    return siglip, folder


def _pretrained_config(uri: str) -> PS3ModelConfig:
    return PS3ModelConfig(**{**PS3ModelConfig.tiny().model_dump(exclude={"vision", "text"}), "pretrained": uri})


def _assert_adopted(model: PS3CLIP, siglip: SiglipModel) -> None:
    vit_q = siglip.vision_model.encoder.layers[2].self_attn.q_proj.weight
    assert torch.equal(model.vision.vit.encoder.layers[2].self_attn.q_proj.weight, vit_q)
    assert torch.equal(model.vision.vit.head.probe, siglip.vision_model.head.probe)
    token_embedding = siglip.text_model.embeddings.token_embedding.weight
    assert torch.equal(model.text.embeddings.token_embedding.weight, token_embedding)
    assert float(model.logit_bias.detach()) == pytest.approx(-3.5)


def test_loading_a_saved_siglip_folder_adopts_its_weights(saved_siglip):
    siglip, folder = saved_siglip
    model = PS3CLIP.from_config(_pretrained_config(str(folder)))
    _assert_adopted(model, siglip)
    model(**_train_batch())  # and it runs


def test_loading_siglip_weights_from_an_s3_prefix(saved_siglip, s3_server, s3_bucket, tmp_path):
    siglip, folder = saved_siglip
    client = s3_server.client()
    for path in folder.iterdir():
        client.put_object(Bucket=s3_bucket, Key=f"models/siglip/{path.name}", Body=path.read_bytes())
    model = PS3CLIP.from_config(_pretrained_config(f"s3://{s3_bucket}/models/siglip"), cache_dir=str(tmp_path))
    _assert_adopted(model, siglip)


def test_a_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="no config"):
        PS3CLIP.from_config(_pretrained_config(str(tmp_path)))


def test_config_rejects_inconsistent_settings():
    tiny = PS3ModelConfig.tiny().model_dump()
    with pytest.raises(ValueError, match="either both"):
        PS3ModelConfig(**{**tiny, "pretrained": "/somewhere"})
    with pytest.raises(ValueError, match="position table"):
        PS3ModelConfig(**{**tiny, "scales": [70, 140, 280]})
    with pytest.raises(ValueError, match="select_layers"):
        PS3ModelConfig(**{**tiny, "select_layers": [0, 4]})
    with pytest.raises(ValueError, match="increase"):
        PS3ModelConfig(**{**tiny, "scales": [56, 56, 224]})
    with pytest.raises(ValueError):
        PS3ModelConfig(**{**tiny, "unknown": 1})


def test_paper_config_numbers():
    cfg = PS3ModelConfig.paper_1p5k(pretrained="/models/siglip-so400m-patch14-384")
    assert cfg.scales == [378, 756, 1512] and cfg.grid_sizes == [27, 54, 108]
    assert cfg.select_layers == [0, 9, 18, 26] and cfg.conv_input_size == 1512
    assert split_budget(cfg.max_select, cfg.scales[1:]) == [512, 2048]
    assert (cfg.conv_hidden, cfg.conv_blocks, cfg.embed_dim, cfg.logit_bias_init) == (512, 3, 1152, -10.0)
    assert PS3ModelConfig.paper_1p5k().vision["num_hidden_layers"] == 27


def test_4k_config_numbers_and_per_scale_budgets():
    cfg = PS3ModelConfig.paper_4k()
    assert cfg.scales == [378, 756, 1512, 3780] and cfg.grid_sizes == [27, 54, 108, 270]
    assert cfg.conv_input_size == 1512 and cfg.round_quotas == [85, 341, 2134]
    assert cfg.max_highres_tokens == 87_480
    own = PS3ModelConfig(**{**cfg.model_dump(), "select_per_scale": [160, 640, 1760]})
    assert own.round_quotas == [160, 640, 1760]
    with pytest.raises(ValueError, match="select_per_scale"):
        PS3ModelConfig(**{**cfg.model_dump(), "select_per_scale": [100, 100, 100]})


def _encode_by_plan(num_select: int, quotas: list[int], grids: list[int]) -> tuple[int, int, list[int]]:
    """(rounds, patches taken, patches left per scale) when every round rolls over against the free patches."""
    free = [g * g for g in grids]
    plan = round_plan(num_select, quotas, sum(free))
    taken = 0
    for round_quotas in plan:
        counts = roll_over(round_quotas, free)
        free = [f - c for f, c in zip(free, counts, strict=True)]
        taken += sum(counts)
    return len(plan), taken, free


@pytest.mark.parametrize(
    ("cfg", "rounds", "tokens"),
    [(PS3ModelConfig.paper_1p5k(), 6, 15_309), (PS3ModelConfig.paper_4k(), 35, 88_209)],
    ids=["1.5K", "4K"],
)
def test_all_patches_are_encoded_in_the_reference_round_count(cfg, rounds, tokens):
    # the reference: num_look_close="all" runs ceil(max_patches / 2560) rounds of the full per-scale quotas
    num_rounds, taken, left = _encode_by_plan(10**9, cfg.round_quotas, cfg.grid_sizes[1:])
    assert (num_rounds, cfg.grid_sizes[0] ** 2 + taken, left) == (rounds, tokens, [0] * len(left))


def test_a_smaller_budget_runs_full_rounds_then_a_rescaled_last_one():
    assert round_plan(5000, [85, 341, 2134], 87_480) == [[85, 341, 2134], [81, 325, 2034]]
    assert round_plan(1000, [512, 2048], 14_580) == [[200, 800]]
    assert round_plan(0, [512, 2048], 14_580) == []


def test_the_tiny_model_encodes_every_patch_when_asked_for_all(vision):
    out = encode_image(vision, _images(), num_select=10**6)
    counts = [s.shape[1] for s in out.selected]
    assert counts == [64, 256] and out.high_res_tokens.shape[1] == 320
    assert all(bool((s.diff(dim=1) > 0).all()) for s in out.selected)  # every patch once, in raster order


def test_bad_inputs_are_rejected(vision):
    with pytest.raises(ValueError, match="square"):
        vision(torch.zeros(1, 3, 224, 112))
    with pytest.raises(ValueError, match="gt_maps"):
        vision(torch.zeros(1, 3, 224, 224), gt_maps=torch.zeros(1, 112, 112))
    with pytest.raises(ValueError, match="is_global"):
        vision(torch.zeros(1, 3, 224, 224), is_global=torch.zeros(1))
