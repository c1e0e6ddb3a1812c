"""Response models of the web API (they make the OpenAPI schema precise)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class CoTOut(BaseModel):
    """A parsed chain of thought."""

    caption: str
    reasoning: str
    conclusion: str
    well_formed: bool = Field(description="all three parts present, closed and in order")
    problems: list[str] = Field(default_factory=list, description="what was wrong when not well formed")
    raw: str = Field("", description="the generated text as it came out of the model")


class ResultOut(BaseModel):
    rank: int = Field(description="1 for the best match")
    id: str = Field(description="gallery image id")
    score: float = Field(description="cosine similarity between the query and the image embedding")
    url: str = Field(description="where to GET the image")


class ReferenceOut(BaseModel):
    kind: Literal["upload", "gallery"]
    id: str | None = None
    url: str | None = None
    width: int
    height: int


class QueryOut(BaseModel):
    text: str
    mode: Literal["full", "fast"]
    k: int
    reference: ReferenceOut


class SearchOut(BaseModel):
    """The answer to a search: the reasoning (null in fast mode) and the ranked gallery images."""

    query: QueryOut
    cot: CoTOut | None = Field(description="the reasoning; null in fast mode")
    edited: bool = Field(False, description="true when the reasoning was given by the client, not generated")
    results: list[ResultOut]
    timings_ms: dict[str, float]


class GalleryItem(BaseModel):
    id: str
    url: str


class GalleryPage(BaseModel):
    total: int = Field(description="gallery images matching the filter")
    offset: int
    items: list[GalleryItem]


class HealthOut(BaseModel):
    status: Literal["ok"]
    version: str
    model_fingerprint: str | None
    embedding_dim: int | None
    gallery_size: int
    index_matches_model: bool
    api_key_required: bool
    limits: dict[str, int]


class ErrorOut(BaseModel):
    detail: str
