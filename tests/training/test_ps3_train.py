"""The PS3 launcher on local Ray Train: corpus check first, checkpoints to S3, resume, non-finite stop."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ps3_engine.infra.storage import S3Settings, Storage
from ps3_engine.pipeline.cli import main
from ps3_engine.schemas.corpus import MANIFEST_KEY
from ps3_engine.training.ps3.recipes import load_recipe
from ps3_engine.training.ps3.tokenizer import build_tiny_text_tokenizer
from ps3_engine.training.ps3.train import CorpusRejected, launch, lr_at
from tests.training.test_ps3_data import write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-corpus")
    write_corpus(root)
    return root


@pytest.fixture(scope="module")
def debug_recipe(tmp_path_factory):
    tokenizer = build_tiny_text_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    # The test corpus has 5 training images: 2 workers x 2 samples per step.
    return load_recipe("debug", {"tokenizer": str(tokenizer), "batch_size_per_worker": 2, "max_steps": 3})


@given(st.integers(0, 5000))
def test_lr_warms_up_then_decays(step):
    recipe = load_recipe("paper-1.5k")
    factor = lr_at(step, recipe)
    assert 0.0 <= factor <= 1.0
    if step < recipe.warmup_steps:
        assert factor == pytest.approx((step + 1) / recipe.warmup_steps)
    elif step > recipe.warmup_steps:
        assert factor <= lr_at(step - 1, recipe) + 1e-12


def test_recipes_validate_their_settings():
    paper = load_recipe("paper-1.5k")
    assert (paper.lr, paper.warmup_steps, paper.weight_decay, paper.betas) == (5e-6, 1500, 3e-4, (0.9, 0.95))
    assert paper.model.max_select == 2560 and paper.global_caption_prob == 0.25
    with pytest.raises(ValueError, match="needs use_gpu"):
        load_recipe("debug", {"precision": "bf16"})
    with pytest.raises(ValueError, match="unknown recipe"):
        load_recipe("nope")


def test_paper_recipes_carry_the_reference_training_settings():
    # train/scripts/ps3_{1.5k,4k}_siglip.sh: --precision amp, --grad-checkpointing, no --grad-clip-norm,
    # no --token_selection_lr (the selection modules decay like the rest)
    for name, batch, steps, scales in (
        ("paper-1.5k", 8192, 9156, [378, 756, 1512]),
        ("paper-4k", 4096, 18311, [378, 756, 1512, 3780]),
    ):
        paper = load_recipe(name)
        assert (paper.precision, paper.grad_checkpointing, paper.grad_clip_norm) == ("fp16", True, None), name
        assert paper.selection_lr is None and paper.selection_weight_decay == 0.0
        assert paper.batch_size_per_worker * paper.num_workers == batch and paper.max_steps == steps
        assert paper.model.scales == scales and paper.model.max_select == 2560
    assert load_recipe("paper-1.5k", {"precision": "bf16"}).precision == "bf16"


def test_selection_parameters_decay_unless_they_get_their_own_lr():
    import torch

    from ps3_engine.training.ps3.model import PS3CLIP
    from ps3_engine.training.ps3.train import TrainState

    recipe = load_recipe("debug", {"tokenizer": "unused"})
    model = PS3CLIP.from_config(recipe.model)
    prompt_proj = model.vision.selector.prompt_proj.fc1.weight

    def group_of(state: TrainState) -> dict:
        return next(g for g in state.optimizer.param_groups if any(p is prompt_proj for p in g["params"]))

    assert group_of(TrainState.create(model, recipe))["weight_decay"] == recipe.weight_decay
    own = TrainState.create(model, recipe.model_copy(update={"selection_lr": 1e-2, "selection_weight_decay": 0.0}))
    assert (group_of(own)["lr"], group_of(own)["weight_decay"]) == (1e-2, 0.0)
    assert isinstance(own.optimizer, torch.optim.AdamW)


def test_a_broken_corpus_is_refused_before_anything_starts(corpus, debug_recipe, tmp_path):
    broken = tmp_path / "broken"
    storage = Storage(str(broken))
    manifest = Storage(str(corpus)).read_json(MANIFEST_KEY)
    storage.write_json_atomic(MANIFEST_KEY, {**manifest, "schema_version": 99})
    with pytest.raises(CorpusRejected, match="schema_version"):
        launch(str(broken), debug_recipe, str(tmp_path / "store"), "refused")
    assert not (tmp_path / "store").exists()  # no trainer, no run folder


def test_checkpoints_to_s3_and_resumes_from_the_latest(ray_local, s3_server, s3_bucket, corpus, debug_recipe):
    storage_path = f"s3://{s3_bucket}/training"
    s3 = S3Settings()
    first = launch(str(corpus), debug_recipe, storage_path, "resume-me", s3)
    assert first.steps == 3 and first.metrics["resumed_from_step"] == 0
    assert first.checkpoint_path and first.checkpoint_path.startswith(f"{storage_path}/resume-me/checkpoint_")
    assert all(math.isfinite(first.metrics[k]) for k in ("total", "contrastive", "prior_bce", "posterior_bce"))
    keys = [o.key for o in Storage(storage_path, s3).list("resume-me/")]
    assert any(k.endswith("state.pt") for k in keys) and any(k.endswith("recipe.json") for k in keys)
    longer = debug_recipe.model_copy(update={"max_steps": 5})
    second = launch(str(corpus), longer, storage_path, "resume-me", s3)
    assert second.steps == 5 and second.metrics["resumed_from_step"] == 3


def test_a_non_finite_loss_stops_training(ray_local, corpus, debug_recipe, tmp_path):
    poisoned = load_recipe(
        "debug",
        {
            **debug_recipe.model_dump(mode="json"),
            "model": {**debug_recipe.model.model_dump(mode="json"), "logit_bias_init": float("nan")},
        },
    )
    with pytest.raises(Exception, match="loss is nan"):
        launch(str(corpus), poisoned, str(tmp_path / "store"), "nan")


def test_cli_trains_the_debug_recipe(ray_local, corpus, debug_recipe, tmp_path, capsys):
    argv = ["train", "ps3", "--corpus", str(corpus), "--recipe", "debug", "--storage-path", str(tmp_path / "store")]
    argv += ["--tokenizer", debug_recipe.tokenizer, "--set", "batch_size_per_worker=2", "--set", "max_steps=2"]
    assert main(argv) == 0
    assert "[train ps3] debug: 2 steps" in capsys.readouterr().out


def _fixed_batch(corpus, recipe, size: int = 4) -> dict:
    import numpy as np
    import torch

    from ps3_engine.training.ps3.data import CorpusSampleTransform, iter_samples

    transform = CorpusSampleTransform(
        image_size=recipe.image_size,
        tokenizer_path=recipe.tokenizer,
        context_length=recipe.context_length,
        global_caption_prob=0.25,
        seed=1,
        epoch=0,
    )
    samples = list(iter_samples(str(corpus), "train", transform, limit=size))
    assert len(samples) == size
    keys = ("pixel_values", "gt_map", "input_ids", "is_global")
    return {k: torch.from_numpy(np.stack([np.asarray(s[k]) for s in samples])) for k in keys}


def _state(recipe):
    import torch

    from ps3_engine.training.ps3.model import PS3CLIP
    from ps3_engine.training.ps3.train import TrainState

    torch.manual_seed(recipe.seed)
    return TrainState.create(PS3CLIP.from_config(recipe.model), recipe)


def test_the_loss_decreases_over_a_few_dozen_steps(corpus, debug_recipe):
    import torch

    from ps3_engine.training.ps3.train import train_step

    recipe = debug_recipe.model_copy(update={"max_steps": 30, "warmup_steps": 3})
    batch, state = _fixed_batch(corpus, recipe), _state(recipe)
    losses = [train_step(state, batch, torch.device("cpu"))["total"] for _ in range(30)]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses


def test_resuming_from_a_checkpoint_gives_the_same_next_step(corpus, debug_recipe, tmp_path):
    import torch

    from ps3_engine.training.ps3.train import train_step

    recipe = debug_recipe.model_copy(update={"max_steps": 10, "warmup_steps": 2})
    batch, cpu = _fixed_batch(corpus, recipe), torch.device("cpu")
    original = _state(recipe)
    for _ in range(3):
        train_step(original, batch, cpu)
    torch.save(original.state_dict(), tmp_path / "state.pt")
    expected = train_step(original, batch, cpu)

    resumed = _state(recipe.model_copy(update={"seed": 123}))  # different init: everything must come from the file
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=False))
    assert resumed.step == 3
    got = train_step(resumed, batch, cpu)
    assert got["total"] == pytest.approx(expected["total"], rel=1e-5) and got["lr"] == expected["lr"]
    for (name, a), b in zip(original.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name
