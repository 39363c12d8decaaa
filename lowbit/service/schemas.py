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
    """The active encoder at the top level (null fields when only a causal LM is active), the active
    causal LM under ``lm`` (null when none)."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())
    id: Optional[str]
    is_quantized: Optional[bool]
    scheme: Optional[str] = None
    revision: Optional[int]
    lm: Optional[dict[str, Any]] = None


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


# ---- text generation (OpenAI-compatible; see openai_routes.py) -----------------------------------

StopField = Optional[Union[str, list[str]]]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = Field(False, description="send a last chunk with the token usage before [DONE]")


class _GenerationFields(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: Optional[str] = Field(None, max_length=256, description="ignored: the active causal LM serves")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0: greedy (argmax); >0: sampling")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling: smallest set of tokens with this mass")
    seed: Optional[int] = Field(None, ge=0, le=2**63 - 1, description="makes a sampled generation reproducible")
    stop: StopField = Field(None, description="up to 4 strings; generation ends before the first one")
    stream: bool = Field(False, description="server-sent events: data: {chunk} ... data: [DONE]")
    stream_options: Optional[StreamOptions] = None
    n: int = Field(1, ge=1, le=1, description="completions per request: only 1 is supported")
    presence_penalty: float = Field(0.0, ge=0.0, le=0.0, description="not supported: must be 0")
    frequency_penalty: float = Field(0.0, ge=0.0, le=0.0, description="not supported: must be 0")
    user: Optional[str] = Field(None, max_length=256)


class CompletionRequest(_GenerationFields):
    """OpenAI ``/v1/completions``: one prompt (a string, or a list holding one string)."""

    prompt: Union[str, list[str]] = Field(description="the text to continue")
    max_tokens: Optional[int] = Field(16, ge=1, description="new tokens at most (OpenAI's default: 16)")


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[ContentPart]]
    name: Optional[str] = Field(None, max_length=64)


class ChatCompletionRequest(_GenerationFields):
    """OpenAI ``/v1/chat/completions``: messages rendered with the model's chat template (or plain lines)."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_tokens: Optional[int] = Field(None, ge=1, description="new tokens at most (default: the service limit)")
    max_completion_tokens: Optional[int] = Field(None, ge=1, description="OpenAI's newer name for max_tokens")
