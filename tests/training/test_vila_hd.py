"""VILA-HD on tiny configs (CPU): chat format, projector, both passes, budgets, prompt-driven selection, training
steps, checkpoints, grounded data from the corpus and a 2-worker Ray Train run of the ``debug`` recipe.

The selection test plants four coloured squares per image (one per quadrant) and asks about one colour,
so only a selection that reads the prompt can find the evidence square.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from ps3_engine.infra.storage import Storage
from ps3_engine.training.ps3.train import NonFiniteLoss
from ps3_engine.training.vila_hd.config import VilaHDConfig
from ps3_engine.training.vila_hd.data import (
    GroundedSampleMaker,
    SFTSampleTransform,
    VilaHDSample,
    caption_subject,
    grounded_samples_from_corpus,
)
from ps3_engine.training.vila_hd.infer import answer, load_for_inference
from ps3_engine.training.vila_hd.model import VilaHD
from ps3_engine.training.vila_hd.projector import space_to_channel
from ps3_engine.training.vila_hd.recipes import ALL_COMPONENTS, load_recipe
from ps3_engine.training.vila_hd.sequence import find_prompt_ends, left_align, resolve_budget
from ps3_engine.training.vila_hd.sft_dataset import (
    SFT_MANIFEST_KEY,
    check_sft_dataset,
    check_training_data,
    training_rows,
    write_sft_dataset,
)
from ps3_engine.training.vila_hd.synthetic import SQUARE_COLOURS, SYNTHETIC_QUESTION, quadrant_samples
from ps3_engine.training.vila_hd.tiny_tokenizer import build_tiny_chat_tokenizer
from ps3_engine.training.vila_hd.tokenizer import (
    IGNORE_INDEX,
    IMAGE_TOKEN,
    encode_conversation,
    load_chat_tokenizer,
    render_conversation,
)
from ps3_engine.training.vila_hd.train import DataRejected, VilaHDTrainer, launch, read_state
from tests.training.test_ps3_data import write_corpus

SIZE = 224  # the tiny PS3's largest scale: grids 4 (low-res), 8 and 16
CONTEXT = 48
NUM_PATCHES = 8 * 8 + 16 * 16


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls on a shared CPU run much faster on one thread than contending for several."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> str:
    return str(build_tiny_chat_tokenizer(tmp_path_factory.mktemp("vila-hd-tokenizer")))


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return load_chat_tokenizer(tokenizer_dir)


def _tensors(samples: list[VilaHDSample], tokenizer_dir: str) -> dict[str, torch.Tensor]:
    transform = SFTSampleTransform(image_size=SIZE, tokenizer_path=tokenizer_dir, context_length=CONTEXT)
    examples = [transform(s.to_row()) for s in samples]
    return {k: torch.from_numpy(np.stack([e[k] for e in examples])) for k in examples[0]}


@pytest.fixture(scope="module")
def batch(tokenizer_dir) -> dict[str, torch.Tensor]:
    return _tensors(quadrant_samples(4, seed=5, selection_share=0.25), tokenizer_dir)


def _model(tokenizer, seed: int = 0, **changes) -> VilaHD:
    torch.manual_seed(seed)
    cfg = VilaHDConfig(**{**VilaHDConfig.tiny().model_dump(), **changes})
    return VilaHD.from_config(cfg, tokenizer)


def _forward(model: VilaHD, batch: dict[str, torch.Tensor], **kwargs):
    return model(
        batch["pixel_values"],
        batch["input_ids"],
        batch["attention_mask"],
        batch["labels"],
        batch["evidence_map"].float(),
        **kwargs,
    )


# ---- chat format and pure pieces -------------------------------------------------------------------
def test_conversations_encode_as_the_chat_template_renders_and_only_answers_are_supervised(tokenizer):
    turns = [("user", "Where is the red square?"), ("assistant", "In the top left.")]
    ids, labels = encode_conversation(tokenizer, turns)
    messages = [{"role": "user", "content": f"{IMAGE_TOKEN}\nWhere is the red square?"}]
    messages.append({"role": "assistant", "content": "In the top left."})
    assert (
        tokenizer.decode(ids) == render_conversation(turns) == tokenizer.apply_chat_template(messages, tokenize=False)
    )
    assert ids.count(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)) == 1
    assert tokenizer.decode([t for t in labels if t != IGNORE_INDEX]) == "In the top left.<|im_end|>"
    _, unsupervised = encode_conversation(tokenizer, turns, supervise=False)
    assert set(unsupervised) == {IGNORE_INDEX}
    prompt, _ = encode_conversation(tokenizer, turns[:1], add_generation_prompt=True)
    assert tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")
    image_pos = torch.tensor([ids.index(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))])
    end = int(find_prompt_ends(torch.tensor([ids]), image_pos, tokenizer.eos_token_id)[0])
    assert tokenizer.decode(ids[end]) == "?"  # the last user-prompt token


def test_space_to_channel_pads_odd_grids_like_nvila():
    assert space_to_channel(torch.zeros(1, 27, 27, 5)).shape == (1, 196, 20)  # 729 low-res -> 196 LLM tokens
    grid = torch.arange(16.0).view(1, 4, 4, 1)
    blocks = space_to_channel(grid)
    assert blocks.shape == (1, 4, 4)
    assert blocks[0, 0].tolist() == [0, 1, 4, 5] and blocks[0, 3].tolist() == [10, 11, 14, 15]


def test_budgets_and_left_alignment():
    assert resolve_budget(None, None, 2560, 10240) == 10240
    assert resolve_budget(None, 6, 2560, 10240) == 15360
    assert resolve_budget(100, None, 2560, 10240) == 100
    with pytest.raises(ValueError, match="not both"):
        resolve_budget(1, 1, 2560, 10240)
    embeds, mask = torch.arange(6.0).view(2, 3, 1), torch.tensor([[1, 1, 0], [1, 1, 1]])
    left, left_mask = left_align(embeds, mask)
    assert left[0, 1:, 0].tolist() == [0.0, 1.0] and left_mask.tolist() == [[0, 1, 1], [1, 1, 1]]


# ---- the model -----------------------------------------------------------------------------------
def test_forward_gives_finite_losses_and_logits_over_text_plus_vision_tokens(tokenizer, batch):
    model = _model(tokenizer)
    out = _forward(model, batch)
    assert all(torch.isfinite(v) for v in (out.loss, out.lm_loss, out.selection_loss))
    assert out.selection_loss > 0 and out.lm_loss > 0
    lengths = batch["attention_mask"].sum(1) - 1 + torch.tensor(out.vision.num_vision_tokens)
    assert out.logits.shape == (4, int(lengths.max()), model.llm.config.vocab_size)
    assert out.vision.low_res.shape == (4, 4, model.llm.config.hidden_size)  # 4x4 low-res grid -> 2x2


def test_pass_one_runs_without_grad_and_pass_two_with(tokenizer, batch):
    model = _model(tokenizer)
    grad_modes: list[bool] = []
    hook = model.llm.get_decoder().register_forward_hook(lambda *_: grad_modes.append(torch.is_grad_enabled()))
    out = _forward(model, batch)
    hook.remove()
    assert grad_modes == [False, True]  # pass 1 (prompt) then pass 2 (full sequence)
    assert out.vision.prompt_hidden is not None and not out.vision.prompt_hidden.requires_grad
    out.loss.backward()
    groups = model.components()
    for name in ("llm", "projector", "top_down_head", "selector"):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in groups[name]), name
    # the head only learns from the selection loss: no LM gradient crosses the no-grad pass or the top-k
    model.zero_grad()
    out = _forward(model, batch)
    out.lm_loss.backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in groups["top_down_head"])


@pytest.mark.parametrize("num_select", [0, 20, 48, 100, 200, 10_000])
def test_the_patch_budget_is_respected_and_vision_tokens_are_low_res_plus_complete_blocks(tokenizer, batch, num_select):
    model = _model(tokenizer).eval()
    with torch.no_grad():
        out = _forward(model, batch, num_select=num_select)
    selected = out.vision.selected
    if num_select <= 200:
        assert sum(s.shape[1] for s in selected) == num_select
    else:  # PS3 drops what the full last scale cannot take (as the reference): a few first-scale patches stay out
        assert NUM_PATCHES - 8 <= sum(s.shape[1] for s in selected) <= NUM_PATCHES
    for sample in range(4):
        complete = 0
        for index, grid in zip(selected, (8, 16), strict=True):
            chosen = torch.zeros(grid * grid)
            chosen[index[sample]] = 1
            complete += int((chosen.view(grid // 2, 2, grid // 2, 2).sum((1, 3)) == 4).sum())
        assert out.vision.num_vision_tokens[sample] == 16 // 4 + complete
    if num_select == 200:  # 4 rounds of [9, 39] patches (pixel share), then one of [1, 7]
        assert [s.shape[1] for s in selected] == [37, 163]


def test_gt_forced_selection_takes_the_evidence_patches_first(tokenizer, batch):
    model = _model(tokenizer, train_with_gt_selection=True).train()
    out = _forward(model, batch, num_select=48)
    for index, target in zip(out.vision.selected, out.gt_targets, strict=True):
        inside = target.flatten(1).gather(1, index)
        assert bool((inside.sum(1) == torch.minimum(target.flatten(1).sum(1), torch.tensor(index.shape[1]))).all())


def test_generate_answers_with_a_budget_of_rounds(tokenizer, batch):
    model = _model(tokenizer).eval()
    out = model.generate(batch["pixel_values"][:2], ["Where is the red square?", "Hi"], tokenizer, 4, num_look_close=2)
    assert len(out.texts) == 2 and out.num_selected_patches == 96
    bottom_up = model.generate(
        batch["pixel_values"][:1], "Hi", tokenizer, 2, num_select=0, look_close_mode="after_image"
    )
    assert bottom_up.num_vision_tokens == [4] and bottom_up.num_selected_patches == 0


# ---- training ------------------------------------------------------------------------------------
def test_recipes_are_stage_wise_and_validated(tokenizer):
    align, full, debug = load_recipe("align"), load_recipe("full"), load_recipe("debug")
    assert align.trainable == ["projector"] and set(full.trainable) == set(ALL_COMPONENTS)
    assert full.init_from and full.model.num_select == 10240 and full.model.llm_pretrained
    assert (debug.num_workers, debug.cpus_per_worker, debug.use_gpu) == (2, 0.5, False)
    assert load_recipe("debug", {"model.num_select": 96}).model.num_select == 96
    with pytest.raises(ValueError, match="needs use_gpu"):
        load_recipe("debug", {"precision": "bf16"})
    with pytest.raises(ValueError, match="unknown recipe"):
        load_recipe("nope")
    model, trainer = _trainer(tokenizer, trainable=["projector"])
    trained = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert trained == {id(p) for p in model.components()["projector"]}


def _trainer(tokenizer, **recipe_changes) -> tuple[VilaHD, VilaHDTrainer]:
    recipe = load_recipe("debug", recipe_changes)
    model = _model(tokenizer, seed=recipe.seed)
    model.set_trainable(recipe.trainable)
    return model, VilaHDTrainer(model, recipe, model.component_of(), torch.device("cpu"))


def _precision_at_box_size(model: VilaHD, data: dict[str, torch.Tensor]) -> float:
    """Share of the top-k top-down patches inside the evidence box, k = the box's patch count (chance: its area)."""
    model.eval()
    with torch.no_grad():
        out = _forward(model, data)
    model.train()
    probs, target = out.vision.topdown_probs[0].flatten(1), out.gt_targets[0].flatten(1)
    top = probs.topk(int(target.sum(1).min()), dim=1).indices
    return float(target.gather(1, top).mean())


def test_selection_follows_the_prompt_and_the_lm_loss_decreases(tokenizer, tokenizer_dir):
    train = _tensors(quadrant_samples(256, seed=0), tokenizer_dir)
    held_out = quadrant_samples(48, seed=1)
    # the same held-out images, asked about the square diagonally across: the evidence moves with the prompt
    swapped = []
    for sample in held_out:
        colour = sample.turns[0].text.split()[-1]
        quadrant = 3 - next(q for q in range(4) if sample.evidence[0] == _box(q))
        other = _colour_at(sample, quadrant)
        swapped.append(
            sample.model_copy(
                update={
                    "turns": [sample.turns[0].model_copy(update={"text": SYNTHETIC_QUESTION.format(colour=other)})],
                    "kind": "selection",
                    "evidence": [_box(quadrant)],
                }
            )
        )
        assert other != colour
    held, held_swapped = _tensors(held_out, tokenizer_dir), _tensors(swapped, tokenizer_dir)
    model, trainer = _trainer(tokenizer, max_steps=120, warmup_steps=5)
    before = _precision_at_box_size(model, held)
    generator = torch.Generator().manual_seed(0)
    lm_losses = []
    for _ in range(120):
        rows = torch.randint(0, 256, (8,), generator=generator)
        lm_losses.append(trainer.train_step({k: v[rows] for k, v in train.items()})["lm_loss"])
    after, after_swapped = _precision_at_box_size(model, held), _precision_at_box_size(model, held_swapped)
    chance = 0.25  # the evidence square's quadrant is a quarter of the patches
    assert before < chance + 0.2, before
    assert after > chance + 0.4 and after_swapped > chance + 0.4, (before, after, after_swapped)
    assert np.mean(lm_losses[-10:]) < np.mean(lm_losses[:10]) - 0.5, lm_losses


def _box(quadrant: int):
    from ps3_engine.training.vila_hd.synthetic import quadrant_box

    return quadrant_box(quadrant, SIZE, SIZE // 28)


def _colour_at(sample: VilaHDSample, quadrant: int) -> str:
    """The colour drawn in ``quadrant`` (read back from the image)."""
    import io

    from PIL import Image

    from ps3_engine.training.tiny_captioner import COLOURS

    box = _box(quadrant)
    with Image.open(io.BytesIO(sample.image_bytes or b"")) as image:
        pixel = image.convert("RGB").getpixel(((box.x0 + box.x1) // 2, (box.y0 + box.y1) // 2))
    return next(c for c in SQUARE_COLOURS if tuple(COLOURS[c]) == tuple(pixel))


def test_a_non_finite_loss_stops_before_any_update(tokenizer, batch):
    model, trainer = _trainer(tokenizer)
    with torch.no_grad():
        model.projector.fc2.bias.fill_(float("nan"))
    weights = model.llm.lm_head.weight.detach().clone()
    with pytest.raises(NonFiniteLoss, match="loss is nan"):
        trainer.train_step(batch)
    assert torch.equal(model.llm.lm_head.weight, weights) and trainer.step == 0


def test_checkpoints_round_trip_and_serve_inference(tokenizer, tokenizer_dir, batch, tmp_path):
    model, trainer = _trainer(tokenizer)
    for _ in range(2):
        trainer.train_step(batch)
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    torch.save(trainer.state_dict(), folder / "state.pt")
    (folder / "recipe.json").write_text(json.dumps(trainer.recipe.model_dump(mode="json")))
    tokenizer.save_pretrained(folder / "tokenizer")
    restored, resumed = _trainer(tokenizer, seed=7)
    state = torch.load(folder / "state.pt", weights_only=False)
    restored.load_state_dict(state["model"])
    resumed.load_optimizer(state)
    assert resumed.step == 2
    for key, value in model.state_dict().items():
        assert torch.equal(value, restored.state_dict()[key]), key
    assert trainer.train_step(batch)["loss"] == resumed.train_step(batch)["loss"]
    assert torch.equal(model.llm.lm_head.weight, restored.llm.lm_head.weight)  # the Adam moments came back too
    assert read_state(str(folder))["step"] == 2  # what a later stage's ``init_from`` reads
    image = tmp_path / "scene.png"
    image.write_bytes(quadrant_samples(1, seed=3)[0].image_bytes or b"")
    loaded = load_for_inference(str(folder))
    for key, value in loaded[0].state_dict().items():
        assert torch.equal(value, state["model"][key]), key
    result = answer(str(image), "Find the square coloured red", loaded=loaded, num_select=16, max_new_tokens=3)
    assert result.num_selected_patches == 16 and result.num_vision_tokens >= 4 and isinstance(result.answer, str)


# ---- data ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vila-hd-corpus")
    write_corpus(root)
    return root


def test_the_corpus_becomes_selection_and_grounded_qa_samples(corpus, tokenizer_dir):
    samples = list(grounded_samples_from_corpus(str(corpus), "train"))
    assert {s.kind for s in samples} == {"selection", "grounded_qa"}
    assert len(samples) == 2 * 4  # 4 train images with a local caption (one is global-only)
    selection = next(s for s in samples if s.kind == "selection" and s.sample_id.startswith("red-"))
    assert [t.role for t in selection.turns] == ["user"] and "a coloured box" in selection.turns[0].text
    assert selection.evidence[0].model_dump() == {"x0": 40, "y0": 30, "x1": 100, "y1": 80}
    grounded = next(s for s in samples if s.kind == "grounded_qa" and s.sample_id.startswith("red-"))
    assert grounded.turns[1].text.startswith("It is bright.")  # the caption after its first sentence
    assert samples == list(grounded_samples_from_corpus(str(corpus), "train"))  # deterministic templates
    example = SFTSampleTransform(image_size=64, tokenizer_path=tokenizer_dir, context_length=96)(selection.to_row())
    assert set(example["labels"].tolist()) == {IGNORE_INDEX}
    rows, cols = np.nonzero(example["evidence_map"])
    # the box squashed to 64, rasterised inclusively (the reference marks the ceil row and column too)
    assert (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1) == (16, 16, 41, 44)
    assert caption_subject("The image is a close-up. Another.") == "the image is a close-up"
    assert (
        GroundedSampleMaker(kinds=("selection",), max_regions_per_image=1)(_corpus_row(corpus))[0].kind == "selection"
    )


def _corpus_row(corpus: Path) -> dict:
    return Storage(str(corpus)).read_parquet("corpus/part-0.parquet").to_pylist()[0]


def test_sft_datasets_are_written_and_checked(corpus, tmp_path):
    out = str(tmp_path / "sft")
    manifest = write_sft_dataset(out, {"train": quadrant_samples(5, size=56), "validation": quadrant_samples(2)}, 2)
    assert manifest["counts"]["train"] == {"grounded_qa": 5} and len(manifest["shards"]) == 4
    assert check_sft_dataset(out).ok
    assert check_training_data(out)[0] == "sft" and check_training_data(str(corpus))[0] == "corpus"
    kind, check = check_training_data(str(tmp_path / "nothing"))
    assert kind == "unknown" and not check.ok
    Storage(out).write_json_atomic(SFT_MANIFEST_KEY, {**manifest, "schema_version": 99})
    assert any("schema_version" in p for p in check_sft_dataset(out).problems)
    with pytest.raises(ValueError, match="assistant turn"):
        VilaHDSample(**{**quadrant_samples(1)[0].model_dump(), "kind": "selection"})


# ---- Ray Train -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_cpu():
    """Local Ray with 2 CPUs (joins one the session already started)."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


def test_bad_data_is_refused_before_anything_starts(tmp_path):
    with pytest.raises(DataRejected, match="neither"):
        launch(str(tmp_path / "empty"), load_recipe("debug"), str(tmp_path / "store"), "refused")
    assert not (tmp_path / "store").exists()


def test_ray_data_turns_corpus_rows_into_grounded_samples(ray_cpu, corpus):
    rows = training_rows(str(corpus), "corpus", "train").take_all()
    assert sorted(r["sample_id"] for r in rows) == sorted(
        s.sample_id for s in grounded_samples_from_corpus(str(corpus), "train")
    )
    assert VilaHDSample(**rows[0]).evidence


def test_two_workers_train_the_debug_recipe_checkpoint_and_resume(ray_cpu, tokenizer_dir, tmp_path):
    data = str(tmp_path / "sft")
    write_sft_dataset(data, {"train": quadrant_samples(16, seed=2, selection_share=0.25)})
    recipe = load_recipe("debug", {"tokenizer": tokenizer_dir, "max_steps": 2, "context_length": CONTEXT})
    first = launch(data, recipe, str(tmp_path / "store"), "vila-debug")
    assert first.steps == 2 and first.metrics["resumed_from_step"] == 0
    assert all(np.isfinite(first.metrics[k]) for k in ("loss", "lm_loss", "selection_loss"))
    assert first.checkpoint_path and (Path(first.checkpoint_path) / "tokenizer" / "tokenizer.json").is_file()
    second = launch(data, recipe.model_copy(update={"max_steps": 3}), str(tmp_path / "store"), "vila-debug")
    assert second.steps == 3 and second.metrics["resumed_from_step"] == 2
    assert second.checkpoint_path
    result = answer(_scene(tmp_path), "Find the square coloured blue", second.checkpoint_path, max_new_tokens=2)
    assert result.num_select == 48 and result.num_selected_patches == 48


def _scene(tmp_path: Path) -> str:
    path = tmp_path / "scene.png"
    path.write_bytes(quadrant_samples(1, seed=9)[0].image_bytes or b"")
    return str(path)


def test_cli_answers_with_the_requested_budget(tmp_path, capsys):
    from PIL import Image

    from ps3_engine.pipeline.cli import main

    image = tmp_path / "q.jpg"
    Image.new("RGB", (300, 300), (200, 30, 30)).save(image)
    argv = ["infer", "vila-hd", "--image", str(image), "--question", "Find the square coloured red"]
    assert main([*argv, "--num-select", "20", "--max-new-tokens", "4"]) == 0
    assert "20 high-res patches" in capsys.readouterr().out


# ---- VILA's feature layer, low-res embeddings, 4K quotas ---------------------------------------------
def test_the_projector_reads_the_second_to_last_block_as_vila_does(tokenizer, batch):
    from ps3_engine.training.ps3.config import PS3ModelConfig

    # selection from blocks 0-2 only, so that changing the last block cannot change which patches are picked
    ps3 = PS3ModelConfig(**{**PS3ModelConfig.tiny().model_dump(), "select_layers": [0, 1, 2]})
    model = _model(tokenizer, ps3=ps3).eval()
    assert model.cfg.vision_select_layer == -2
    with torch.no_grad():
        before = model.encode(
            batch["pixel_values"],
            batch["input_ids"],
            model.llm.get_input_embeddings()(batch["input_ids"]),
            None,
            48,
            "after_image",
        )
        # neither the final LayerNorm nor the last block feeds the projector at layer -2
        model.vision.vit.post_layernorm.weight.mul_(3.0)
        model.vision.vit.encoder.layers[-1].mlp.fc2.bias.add_(5.0)
        after = model.encode(
            batch["pixel_values"],
            batch["input_ids"],
            model.llm.get_input_embeddings()(batch["input_ids"]),
            None,
            48,
            "after_image",
        )
    torch.testing.assert_close(before.low_res, after.low_res)
    for a, b in zip(before.high_res, after.high_res, strict=True):
        torch.testing.assert_close(a, b)


def test_low_res_tokens_get_the_position_map_and_their_own_scale_embedding(tokenizer, batch):
    model = _model(tokenizer).eval()
    assert model.high_res_positions.scale_embed.shape[0] == 3  # low-res + two high-res scales
    embeds = model.llm.get_input_embeddings()(batch["input_ids"])
    with torch.no_grad():
        before = model.encode(batch["pixel_values"], batch["input_ids"], embeds, None, 0, "after_image")
        model.high_res_positions.scale_embed[0].add_(0.5)
        model.high_res_positions.pos_embed.add_(0.25)
        after = model.encode(batch["pixel_values"], batch["input_ids"], embeds, None, 0, "after_image")
    torch.testing.assert_close(after.low_res, before.low_res + 0.75)


def test_the_4k_config_takes_the_paper_split_at_18_percent():
    cfg = VilaHDConfig.production_4k(llm_path="/models/qwen2")
    assert cfg.ps3.scales == [378, 756, 1512, 3780] and cfg.ps3.round_quotas == [1536, 6144, 7680]
    assert cfg.low_res_token_grid**2 + cfg.num_select // 4 == 4036
    assert cfg.selection_loss_weight == 1.0 and VilaHDConfig.production("/models/qwen2").selection_loss_weight == 1.0
    assert VilaHDConfig(ps3=cfg.ps3, llm_pretrained="/m", num_select=10).selection_loss_weight == 0.0  # VILA's default
