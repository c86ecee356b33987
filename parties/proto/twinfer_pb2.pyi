from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Frame(_message.Message):
    __slots__ = ("session_id", "seq", "tag", "dtype", "shape", "data", "chunk_index", "chunk_count", "total_bytes", "error")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CHUNK_INDEX_FIELD_NUMBER: _ClassVar[int]
    CHUNK_COUNT_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    seq: int
    tag: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    chunk_index: int
    chunk_count: int
    total_bytes: int
    error: Error
    def __init__(self, session_id: _Optional[str] = ..., seq: _Optional[int] = ..., tag: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., chunk_index: _Optional[int] = ..., chunk_count: _Optional[int] = ..., total_bytes: _Optional[int] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("error_id", "kind", "message", "origin")
    ERROR_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    error_id: str
    kind: str
    message: str
    origin: str
    def __init__(self, error_id: _Optional[str] = ..., kind: _Optional[str] = ..., message: _Optional[str] = ..., origin: _Optional[str] = ...) -> None: ...

class SeedRequest(_message.Message):
    __slots__ = ("session_id", "role", "protocol")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    role: str
    protocol: str
    def __init__(self, session_id: _Optional[str] = ..., role: _Optional[str] = ..., protocol: _Optional[str] = ...) -> None: ...

class SeedReply(_message.Message):
    __slots__ = ("seed", "key")
    SEED_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    seed: int
    key: bytes
    def __init__(self, seed: _Optional[int] = ..., key: _Optional[bytes] = ...) -> None: ...

class TupleRequest(_message.Message):
    __slots__ = ("session_id", "function", "args_json", "index", "role")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    FUNCTION_FIELD_NUMBER: _ClassVar[int]
    ARGS_JSON_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    function: str
    args_json: str
    index: int
    role: str
    def __init__(self, session_id: _Optional[str] = ..., function: _Optional[str] = ..., args_json: _Optional[str] = ..., index: _Optional[int] = ..., role: _Optional[str] = ...) -> None: ...

class ArrayInfo(_message.Message):
    __slots__ = ("name", "dtype", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class TupleReply(_message.Message):
    __slots__ = ("data", "chunk_index", "chunk_count", "index", "arrays")
    DATA_FIELD_NUMBER: _ClassVar[int]
    CHUNK_INDEX_FIELD_NUMBER: _ClassVar[int]
    CHUNK_COUNT_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ARRAYS_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    chunk_index: int
    chunk_count: int
    index: int
    arrays: _containers.RepeatedCompositeFieldContainer[ArrayInfo]
    def __init__(self, data: _Optional[bytes] = ..., chunk_index: _Optional[int] = ..., chunk_count: _Optional[int] = ..., index: _Optional[int] = ..., arrays: _Optional[_Iterable[_Union[ArrayInfo, _Mapping]]] = ...) -> None: ...

class PrefetchRequest(_message.Message):
    __slots__ = ("session_id", "tuples", "role")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TUPLES_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    tuples: _containers.RepeatedCompositeFieldContainer[TupleRequest]
    role: str
    def __init__(self, session_id: _Optional[str] = ..., tuples: _Optional[_Iterable[_Union[TupleRequest, _Mapping]]] = ..., role: _Optional[str] = ...) -> None: ...

class CloseRequest(_message.Message):
    __slots__ = ("session_id", "role", "error")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    role: str
    error: Error
    def __init__(self, session_id: _Optional[str] = ..., role: _Optional[str] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class CloseReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class OpenRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class OpenReply(_message.Message):
    __slots__ = ("session_id", "port")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    port: int
    def __init__(self, session_id: _Optional[str] = ..., port: _Optional[int] = ...) -> None: ...
