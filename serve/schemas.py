"""The bodies of ``veil serve``'s JSON requests and responses (pydantic): validation and the OpenAPI schema
come from these declarations. Requests are strict (no "1" for 1, no unknown fields, no NaN or infinity),
so a wrong type is a 422 naming the field, never a guess.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from veil.privacy.levels import ENCODINGS, LEVEL_NAMES
from veil.privacy.session import ACTIONS

LevelName = Literal[LEVEL_NAMES]  # type: ignore[valid-type]
Encoding = Literal[ENCODINGS]  # type: ignore[valid-type]
Action = Literal[ACTIONS]  # type: ignore[valid-type]
IDEMPOTENCY_KEY = r"^[A-Za-z0-9_.:-]{8,128}$"


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class PreviewRequest(_Strict):
    """A preview at a level (or raw epsilon/strength/encoding over it) for the chosen protected attributes."""

    level: LevelName | None = Field(None, description="low | medium | high | max (default: the session's level)")
    epsilon: float | None = Field(None, ge=0, le=50, description="expert: randomized-response epsilon (overrides the level's)")
    strength: float | None = Field(None, gt=0, le=1, description="expert: how deep the edit goes, t0/T in (0, 1]")
    encoding: Encoding | None = Field(None, description="expert: invert (DDIM inversion) or noise (fresh secret noise)")
    protected: list[str] | None = Field(None, min_length=1, max_length=64,
                                        description="attributes to protect (default: the session's)")
    n: int = Field(4, ge=1, le=16, description="how many candidates")


class SessionUpdate(_Strict):
    """The owner's corrections and choices on an open session (previews then use them)."""

    attributes: dict[str, int] | None = Field(None, description="corrected values: -1, 1, or 0 (unknown)")
    protected: list[str] | None = Field(None, max_length=64, description="attributes to protect (may be empty)")
    level: LevelName | None = Field(None, description="low | medium | high | max")


class FeedbackRequest(_Strict):
    action: Action = Field(..., description="more_private | less_private | accept | reject")
    idempotency_key: str | None = Field(None, pattern=IDEMPOTENCY_KEY,
                                        description="accept only (or the Idempotency-Key header): a retried accept "
                                                    "with the same key returns the same release and spends nothing")


class ErrorBody(BaseModel):
    """Every error's body (``veil.serve.errors``): what went wrong and how to fix it, and the field it is about."""

    error: str = Field(..., description="one sentence: what is wrong, and how to fix it")
    field: str | None = Field(..., description="the request field it concerns (e.g. body.epsilon, protected, image)")


class Level(BaseModel):
    name: str
    epsilon: float | str
    strength: float
    encoding: str


class Guess(BaseModel):
    value: int
    confidence: float


class SessionState(BaseModel):
    session: str | None = Field(None, description="the capability: only in the answer that creates the session")
    image_id: str
    attributes: dict[str, int]
    guesses: dict[str, Guess] | None
    protected: list[str]
    level: Level
    decision: str | None
    release_id: int | None
    budget: float | None = Field(..., description="per record (composed epsilon, labels and pixels); null = unlimited")
    spent: dict[str, float]
    left: dict[str, float | None] = Field(..., description="budget left per protected attribute (null = unlimited)")
    history: list[dict] = Field(default_factory=list, description="releases of this image, oldest first")
    image: str | None = Field(None, description="the image the model edits (data URL), on creation")
    warnings: list[str] = Field(default_factory=list, description="on creation from an upload: what the owner "
                                "should know, e.g. enlarged more than 2x to the model's size (not a refusal)")


class FeedbackResponse(BaseModel):
    action: str
    decision: str | None
    level: Level
    suggestion: str | None = Field(None, description="what to do next")
    release_id: int | None = Field(None, description="accept: the ledger row (a refused edit is recorded and charged too)")
    release: dict | None = None
    refusal: str | None = Field(None, description="accept, refused: why, in words (the check's readings included)")
    check: dict | None = Field(None, description="accept, refused: what the checker read: attempts, threshold, and "
                                                 "per protected attribute the probability it showed its released value")
    replayed: bool = False
