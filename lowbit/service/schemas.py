"""Request and response bodies of the HTTP API (pydantic), as they appear in ``/openapi.json``."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

Scalar = Union[bool, int, float, str, None]


class ErrorResponse(BaseModel):
    detail: Any = Field(description="what was wrong and what is valid")


class EmbedRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inputs: Union[str, list[str]] = Field(description="one sentence or a batch (at most the service's max_batch)")
    truncate: bool = Field(True, description="cut inputs longer than the model's token limit (false: refuse them)")


class EmbedResponse(BaseModel):
    model: str = Field(description="id of the model that computed these embeddings")
    is_quantized: bool
    revision: int = Field(description="serving revision: changes with every activation or recalibration")
    dim: int
    embeddings: list[list[float]]
    usage: dict[str, int]


class OpenAIEmbeddingRequest(BaseModel):
    """The OpenAI ``/v1/embeddings`` request; ``model`` is echoed, the active model always answers."""

    model_config = ConfigDict(extra="forbid")
    input: Union[str, list[str]]
    model: Optional[str] = Field(None, max_length=256, description="ignored: the active model serves")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = Field(None, description="must equal the model's dimension if given")
    user: Optional[str] = Field(None, max_length=256)


class OpenAIEmbedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: Union[list[float], str]


class OpenAIEmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIEmbedding]
    model: str
    usage: dict[str, int]


class QuantizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scheme: str = Field(description="a scheme name, as in `lowbit quantize --list-schemes`", max_length=64)
    options: dict[str, Scalar] = Field(default_factory=dict,
                                       description="scheme options (bits, group_size, alpha, kernel, ...)")
    target_id: Optional[str] = Field(None, description="id of the new model (default: '<source>-<scheme>')",
                                     max_length=256)
    calib: Optional[int] = Field(None, description="calibration samples from the built-in set", ge=1, le=4096)
    calibration: Literal["builtin", "traffic"] = Field(
        "builtin", description="calibrate on the built-in set or on buffered traffic (online calibration on)")
    overwrite: bool = False


class ModelSummary(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())
    id: str
    available: bool
    reason: Optional[str] = None
    active: bool
    is_quantized: Optional[bool] = None


class ModelList(BaseModel):
    models: list[ModelSummary]


class ActiveModelInfo(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())
    id: str
    is_quantized: bool
    scheme: Optional[str] = None
    revision: int


class JobInfo(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    kind: str
    status: Literal["queued", "running", "succeeded", "failed"]
    stage: str
    progress: float
    error: Optional[str] = None
    result: Optional[dict[str, Any]] = None


class JobList(BaseModel):
    jobs: list[JobInfo]


class Health(BaseModel):
    model_config = ConfigDict(extra="allow")
    status: Literal["ok"]
    active: Optional[str] = None


class CalibrationStatus(BaseModel):
    model_config = ConfigDict(extra="allow")
    config: dict[str, Any]
    buffer: dict[str, int]
    history: list[dict[str, Any]]
