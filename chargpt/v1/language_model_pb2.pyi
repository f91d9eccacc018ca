from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_TIME_LIMIT: _ClassVar[FinishReason]
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_TIME_LIMIT: FinishReason

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop", "logprobs", "top_logprobs", "characters_per_message", "max_characters_per_message")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    CHARACTERS_PER_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    MAX_CHARACTERS_PER_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    logprobs: bool
    top_logprobs: int
    characters_per_message: int
    max_characters_per_message: int
    def __init__(self, prompt: _Optional[str] = ..., max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., logprobs: _Optional[bool] = ..., top_logprobs: _Optional[int] = ..., characters_per_message: _Optional[int] = ..., max_characters_per_message: _Optional[int] = ...) -> None: ...

class TokenLogprob(_message.Message):
    __slots__ = ("id", "text", "logprob")
    ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    id: int
    text: str
    logprob: float
    def __init__(self, id: _Optional[int] = ..., text: _Optional[str] = ..., logprob: _Optional[float] = ...) -> None: ...

class GeneratedToken(_message.Message):
    __slots__ = ("token", "top")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    token: TokenLogprob
    top: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    def __init__(self, token: _Optional[_Union[TokenLogprob, _Mapping]] = ..., top: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("text", "tokens", "summary")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    text: str
    tokens: _containers.RepeatedCompositeFieldContainer[GeneratedToken]
    summary: GenerateSummary
    def __init__(self, text: _Optional[str] = ..., tokens: _Optional[_Iterable[_Union[GeneratedToken, _Mapping]]] = ..., summary: _Optional[_Union[GenerateSummary, _Mapping]] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_characters", "generated_characters")
    PROMPT_CHARACTERS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_CHARACTERS_FIELD_NUMBER: _ClassVar[int]
    prompt_characters: int
    generated_characters: int
    def __init__(self, prompt_characters: _Optional[int] = ..., generated_characters: _Optional[int] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("queue_seconds", "time_to_first_token_seconds", "total_seconds")
    QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_TOKEN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    queue_seconds: float
    time_to_first_token_seconds: float
    total_seconds: float
    def __init__(self, queue_seconds: _Optional[float] = ..., time_to_first_token_seconds: _Optional[float] = ..., total_seconds: _Optional[float] = ...) -> None: ...

class GenerateSummary(_message.Message):
    __slots__ = ("finish_reason", "usage", "seed", "timings", "stop_sequence", "model")
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    STOP_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    finish_reason: FinishReason
    usage: Usage
    seed: int
    timings: Timings
    stop_sequence: str
    model: ModelRef
    def __init__(self, finish_reason: _Optional[_Union[FinishReason, str]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., seed: _Optional[int] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., stop_sequence: _Optional[str] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ...) -> None: ...

class ModelRef(_message.Message):
    __slots__ = ("step", "weights_sha256")
    STEP_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    step: int
    weights_sha256: str
    def __init__(self, step: _Optional[int] = ..., weights_sha256: _Optional[str] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("text", "context")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    text: str
    context: str
    def __init__(self, text: _Optional[str] = ..., context: _Optional[str] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("logprobs", "total_logprob", "mean_nll", "bits_per_character", "perplexity", "scored_characters", "context_characters", "model")
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    MEAN_NLL_FIELD_NUMBER: _ClassVar[int]
    BITS_PER_CHARACTER_FIELD_NUMBER: _ClassVar[int]
    PERPLEXITY_FIELD_NUMBER: _ClassVar[int]
    SCORED_CHARACTERS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_CHARACTERS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    total_logprob: float
    mean_nll: float
    bits_per_character: float
    perplexity: float
    scored_characters: int
    context_characters: int
    model: ModelRef
    def __init__(self, logprobs: _Optional[_Iterable[float]] = ..., total_logprob: _Optional[float] = ..., mean_nll: _Optional[float] = ..., bits_per_character: _Optional[float] = ..., perplexity: _Optional[float] = ..., scored_characters: _Optional[int] = ..., context_characters: _Optional[int] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("vocabulary", "vocab_size", "block_size", "n_layer", "n_head", "n_embd", "architecture", "parameters", "step", "val_loss", "train_loss", "weights_sha256", "run_name", "dataset_sha256", "device", "dtype", "checkpoint_path", "created", "loaded_at_unix", "options", "context_characters")
    VOCABULARY_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    N_LAYER_FIELD_NUMBER: _ClassVar[int]
    N_HEAD_FIELD_NUMBER: _ClassVar[int]
    N_EMBD_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    VAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    RUN_NAME_FIELD_NUMBER: _ClassVar[int]
    DATASET_SHA256_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_PATH_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    LOADED_AT_UNIX_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_CHARACTERS_FIELD_NUMBER: _ClassVar[int]
    vocabulary: str
    vocab_size: int
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int
    architecture: str
    parameters: int
    step: int
    val_loss: float
    train_loss: float
    weights_sha256: str
    run_name: str
    dataset_sha256: str
    device: str
    dtype: str
    checkpoint_path: str
    created: str
    loaded_at_unix: float
    options: ModelOptions
    context_characters: int
    def __init__(self, vocabulary: _Optional[str] = ..., vocab_size: _Optional[int] = ..., block_size: _Optional[int] = ..., n_layer: _Optional[int] = ..., n_head: _Optional[int] = ..., n_embd: _Optional[int] = ..., architecture: _Optional[str] = ..., parameters: _Optional[int] = ..., step: _Optional[int] = ..., val_loss: _Optional[float] = ..., train_loss: _Optional[float] = ..., weights_sha256: _Optional[str] = ..., run_name: _Optional[str] = ..., dataset_sha256: _Optional[str] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., checkpoint_path: _Optional[str] = ..., created: _Optional[str] = ..., loaded_at_unix: _Optional[float] = ..., options: _Optional[_Union[ModelOptions, _Mapping]] = ..., context_characters: _Optional[int] = ...) -> None: ...

class ModelOptions(_message.Message):
    __slots__ = ("position", "norm", "activation", "qk_norm", "tie_embeddings", "bias", "logit_softcap", "attention_window", "dropout", "bigram_embedding")
    POSITION_FIELD_NUMBER: _ClassVar[int]
    NORM_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    QK_NORM_FIELD_NUMBER: _ClassVar[int]
    TIE_EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    BIAS_FIELD_NUMBER: _ClassVar[int]
    LOGIT_SOFTCAP_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_WINDOW_FIELD_NUMBER: _ClassVar[int]
    DROPOUT_FIELD_NUMBER: _ClassVar[int]
    BIGRAM_EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    position: str
    norm: str
    activation: str
    qk_norm: bool
    tie_embeddings: bool
    bias: bool
    logit_softcap: float
    attention_window: int
    dropout: float
    bigram_embedding: bool
    def __init__(self, position: _Optional[str] = ..., norm: _Optional[str] = ..., activation: _Optional[str] = ..., qk_norm: _Optional[bool] = ..., tie_embeddings: _Optional[bool] = ..., bias: _Optional[bool] = ..., logit_softcap: _Optional[float] = ..., attention_window: _Optional[int] = ..., dropout: _Optional[float] = ..., bigram_embedding: _Optional[bool] = ...) -> None: ...
