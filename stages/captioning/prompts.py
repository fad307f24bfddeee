"""Versioned prompt templates. A caption row records the version, so changing a prompt is a new version."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

# PS3 paper, App. A (spec section 1.3), verbatim including the paper's "there's not text" typo.
PS3_LOCAL_PROMPT = (
    "The second image is a crop from the first image. Given the context of the first image, please describe the "
    "second image briefly. Make sure to cover all the objects and texts in the second image. Make sure to describe "
    "all the attributes, including color, shape, spatial relations, of each object in the second image. If there's "
    "no text in the second image, you don't need to mention there's no text. Please only describe the objects in the "
    "foreground and don't describe the background such as the sky or the weather. Please only describe the objects "
    "in the second image and don't describe the objects in the first image. Please use 1-2 sentences."
)
PS3_GLOBAL_PROMPT = (
    "Please describe the image briefly. Make sure to cover all the objects and texts in the image. Make sure to "
    "describe all the attributes, including color, shape, spatial relations, of each object in the image. If there's "
    "no text in the image, you don't need to mention there's not text. Please only describe the objects in the "
    "foreground and don't describe the background such as the sky or the weather. Please use 2-3 sentences."
)


class PromptTemplates(BaseModel):
    """The two prompts. Local requests send [global image, crop, local prompt]; global [image, global prompt]."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    version: str = Field("ps3-v1", min_length=1, description="recorded in every caption row")
    local: str = Field(PS3_LOCAL_PROMPT, min_length=1)
    global_: str = Field(PS3_GLOBAL_PROMPT, min_length=1, alias="global")
