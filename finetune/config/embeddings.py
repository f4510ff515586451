"""The config of new words ([[embeddings]] tables) and of how they train (keys of [training])."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from finetune.config.base import FROZEN


class EmbeddingConfig(BaseModel):
    """One [[embeddings]] table: a new word learned as token embeddings (textual inversion / pivotal tuning)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    token: str = Field(description="The new word as written in captions and prompts, e.g. \"<myDog>\".")
    vectors: int = Field(1, ge=1, le=16, description="Embedding vectors for the word; n > 1 expands it to "
                         "'<myDog> <myDog>_1 ... <myDog>_{n-1}' in the prompt, as diffusers does.")
    init_word: str | None = Field(None, description="Start from this word's embedding (its tokens repeated or cut "
                                  "to `vectors`); random (the table's own scale) when absent.")
    encoders: list[Literal["clip_l", "clip_g"]] = Field(default_factory=lambda: ["clip_l", "clip_g"], min_length=1,
                                                        description="Which text encoders' rows train; the other "
                                                        "keeps the initial vector.")

    @field_validator("token")
    @classmethod
    def _token(cls, value: str) -> str:
        # A1111 splits bundle_emb.<name>.clip_l on ".", and the file is named after the word.
        if not re.fullmatch(r"<?[A-Za-z0-9_-]+>?", value) or not value.strip("<>"):
            raise ValueError(f"{value!r}: use letters, digits, '_' and '-', optionally in <>, e.g. \"<myDog>\"")
        return value


class EmbeddingTrainingKeys(BaseModel):
    """The [training] keys of the words; `TrainingConfig` inherits them (one table in the TOML)."""

    embedding_lr: float | None = Field(None, json_schema_extra=FROZEN, gt=0, description="Learning rate of the "
                                       "[[embeddings]] rows (default: learning_rate; textual inversion: ~5e-3).")
    embedding_stop_step: int | None = Field(None, json_schema_extra=FROZEN, ge=1, description="Pivotal tuning: the "
                                            "embeddings freeze after this many steps; the LoRA trains on.")
    embedding_stop_fraction: float | None = Field(None, json_schema_extra=FROZEN, gt=0, le=1, description="Pivotal "
                                                  "tuning: freeze them after this fraction of max_steps instead "
                                                  "(diffusers' train_text_encoder_ti_frac).")

    @property
    def embedding_stop(self) -> int | None:
        """The step after which the embeddings freeze (None: they train to the end)."""
        if self.embedding_stop_fraction is not None:
            return max(1, round(self.embedding_stop_fraction * self.max_steps))
        return self.embedding_stop_step


def embedding_problems(training, words: list[EmbeddingConfig]) -> list[str]:
    """[[embeddings]] settings that contradict [training] (TrainConfig's cross-field rules)."""
    problems = []
    if training.method == "embedding" and not words:
        problems.append("training.method = 'embedding' trains [[embeddings]] words: add one, e.g. "
                        "[[embeddings]] token = \"<myDog>\" init_word = \"dog\"")
    if words and training.method == "full":
        problems.append("[[embeddings]] train with training.method = 'embedding' or 'lora' (pivotal), not 'full'")
    if words and training.train_text_encoder:
        problems.append("[[embeddings]] keep the text encoders frozen but for the new rows: set "
                        "training.train_text_encoder = false")
    names = [word.token for word in words]
    if len(set(names)) != len(names):
        problems.append(f"embeddings: a token is listed twice ({', '.join(names)})")
    stops = training.embedding_stop_step, training.embedding_stop_fraction
    if all(s is not None for s in stops):
        problems.append("training.embedding_stop_step and embedding_stop_fraction: set one of them")
    if any(s is not None for s in stops) and training.method != "lora":
        problems.append("training.embedding_stop_*: the embeddings freeze while a LoRA trains on; it needs "
                        "training.method = 'lora' with [[embeddings]]")
    return problems
