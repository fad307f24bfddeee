"""Configuration of VILA-HD (spec section 5): the PS3 encoder, the projector, the LLM and the selection knobs.

The LLM is a transformers Qwen2 causal LM, either built from ``llm`` (``Qwen2Config`` kwargs: tests,
debug) or loaded from ``llm_pretrained`` (a local folder or an ``s3://`` prefix). The PS3 encoder is
built from ``ps3`` (random towers or a SigLIP checkpoint) and, when ``ps3_weights`` names a PS3
training checkpoint folder (the ``state.pt`` that ``ps3-engine train ps3`` writes), takes its
pre-trained vision weights.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ps3_engine.training.ps3.config import PS3ModelConfig
from ps3_engine.training.vila_hd.tokenizer import IMAGE_TOKEN, TINY_VOCAB, TURN_END

# What VILA-HD is made of, the units a training stage unfreezes.
COMPONENTS = ("projector", "top_down_head", "selector", "vision", "llm")
TINY_LLM: dict[str, Any] = {
    "vocab_size": TINY_VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": False,
}


class VilaHDConfig(BaseModel):
    """What a VILA-HD model is made of.

    ``num_select`` is the high-res patch budget per image in training and the default at inference;
    budgets above ``ps3.max_select`` run several selection rounds (``num_look_close``). The paper trains
    with 10,240 patches per image (spec 5.3).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    ps3: PS3ModelConfig
    ps3_weights: str | None = Field(None, description="PS3 training checkpoint folder with state.pt (local/s3://)")
    llm: dict[str, Any] | None = Field(None, description="Qwen2Config kwargs (random-weight LLM)")
    llm_pretrained: str | None = Field(None, description="Qwen2 checkpoint folder (local or s3://)")
    top_down_head: Literal["mlp", "linear"] = "mlp"
    look_close_mode: Literal["after_prompt", "after_image"] = "after_prompt"
    num_select: int = Field(ge=0)
    # VILA's token_selection_loss_weight argument defaults to 0 (the paper's value is not published); the
    # factories below state their own choice.
    selection_loss_weight: float = Field(0.0, ge=0)
    vision_select_layer: int = Field(-2, description="PS3 block whose output feeds the projector (VILA's -2)")
    train_with_gt_selection: bool = False
    pos_embed_grid: int | None = Field(None, ge=1, description="side of the learned high-res position map")
    image_token: str = IMAGE_TOKEN
    prompt_end_token: str = TURN_END

    @model_validator(mode="after")
    def _check(self) -> VilaHDConfig:
        if (self.llm is None) == (self.llm_pretrained is None):
            raise ValueError("give either `llm` (a Qwen2Config dict) or `llm_pretrained` (a checkpoint), not both")
        return self

    @property
    def highres_token_grids(self) -> list[int]:
        """Side of each high-res scale's grid after 2x2 downsampling."""
        return [(g + 1) // 2 for g in self.ps3.grid_sizes[1:]]

    @property
    def low_res_token_grid(self) -> int:
        return (self.ps3.grid_sizes[0] + 1) // 2

    @property
    def resolved_pos_embed_grid(self) -> int:
        return self.pos_embed_grid or max(self.highres_token_grids)

    @classmethod
    def tiny(cls) -> VilaHDConfig:
        """Tiny PS3 (grids 4/8/16, 48 patches a round) + a 2-layer, 64-wide Qwen2: CPU tests and ``debug``."""
        return cls(ps3=PS3ModelConfig.tiny(), llm=dict(TINY_LLM), num_select=48, selection_loss_weight=1.0)

    @classmethod
    def production(
        cls,
        llm_path: str,
        ps3_weights: str | None = None,
        siglip_path: str | None = None,
        num_select: int = 10240,
        **changes: Any,
    ) -> VilaHDConfig:
        """VILA-HD-1.5K: PS3-1.5K (378/756/1512) and a Qwen2 LLM from ``llm_path``.

        Args:
            llm_path: Qwen2 checkpoint folder (local or ``s3://``), also the tokenizer's home.
            ps3_weights: PS3 pre-training checkpoint folder (``state.pt``); without it the encoder starts
                from ``siglip_path`` (or random weights).
            siglip_path: SigLIP checkpoint for the PS3 towers' shapes and initial weights.
            num_select: high-res patches per image (10,240 in the paper's training, 4 rounds of 2560).
            changes: other fields to set.
        """
        return cls(
            ps3=PS3ModelConfig.paper_1p5k(pretrained=siglip_path),
            ps3_weights=ps3_weights,
            llm_pretrained=llm_path,
            num_select=num_select,
            pos_embed_grid=54,  # the 1512 scale's grid after 2x2 downsampling
            # Weight 1 (BCE + Dice beside the LM loss), not VILA's 0: the selection stage trains on
            # answer-less samples and would learn nothing at 0.
            **{"selection_loss_weight": 1.0, **changes},
        )

    @classmethod
    def production_4k(
        cls, llm_path: str, ps3_weights: str | None = None, siglip_path: str | None = None, **changes: Any
    ) -> VilaHDConfig:
        """VILA-HD-4K at the paper's 18% operating point: PS3-4K with one round of 1536 / 6144 / 7680
        patches at 756 / 1512 / 3780 (spec 5.5: 196 low-res + 3840 high-res = 4,036 LLM tokens)."""
        quotas = [1536, 6144, 7680]
        ps3 = PS3ModelConfig.paper_4k(pretrained=siglip_path).model_dump()
        ps3 = PS3ModelConfig(**{**ps3, "max_select": sum(quotas), "select_per_scale": quotas})
        return cls(
            ps3=ps3,
            ps3_weights=ps3_weights,
            llm_pretrained=llm_path,
            num_select=sum(quotas),
            pos_embed_grid=54,
            **{"selection_loss_weight": 1.0, **changes},
        )
