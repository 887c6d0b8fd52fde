from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Variable(_message.Message):
    __slots__ = ("name", "shape", "dtype")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("training_job", "task_type", "task_index", "num_replicas", "strategy", "optimizer", "versions", "variables", "hostname", "pid", "loss_scaled", "sharded", "stepped")
    class VersionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TRAINING_JOB_FIELD_NUMBER: _ClassVar[int]
    TASK_TYPE_FIELD_NUMBER: _ClassVar[int]
    TASK_INDEX_FIELD_NUMBER: _ClassVar[int]
    NUM_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    VARIABLES_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    LOSS_SCALED_FIELD_NUMBER: _ClassVar[int]
    SHARDED_FIELD_NUMBER: _ClassVar[int]
    STEPPED_FIELD_NUMBER: _ClassVar[int]
    training_job: str
    task_type: str
    task_index: int
    num_replicas: int
    strategy: str
    optimizer: str
    versions: _containers.ScalarMap[str, str]
    variables: _containers.RepeatedCompositeFieldContainer[Variable]
    hostname: str
    pid: int
    loss_scaled: bool
    sharded: bool
    stepped: bool
    def __init__(self, training_job: _Optional[str] = ..., task_type: _Optional[str] = ..., task_index: _Optional[int] = ..., num_replicas: _Optional[int] = ..., strategy: _Optional[str] = ..., optimizer: _Optional[str] = ..., versions: _Optional[_Mapping[str, str]] = ..., variables: _Optional[_Iterable[_Union[Variable, _Mapping]]] = ..., hostname: _Optional[str] = ..., pid: _Optional[int] = ..., loss_scaled: _Optional[bool] = ..., sharded: _Optional[bool] = ..., stepped: _Optional[bool] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("session_id", "max_batch_steps", "max_cause")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_CAUSE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    max_batch_steps: int
    max_cause: int
    def __init__(self, session_id: _Optional[str] = ..., max_batch_steps: _Optional[int] = ..., max_cause: _Optional[int] = ...) -> None: ...

class StepReport(_message.Message):
    __slots__ = ("step", "wall_time", "present", "l2_norm", "nan_count", "inf_count", "rewound")
    STEP_FIELD_NUMBER: _ClassVar[int]
    WALL_TIME_FIELD_NUMBER: _ClassVar[int]
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    L2_NORM_FIELD_NUMBER: _ClassVar[int]
    NAN_COUNT_FIELD_NUMBER: _ClassVar[int]
    INF_COUNT_FIELD_NUMBER: _ClassVar[int]
    REWOUND_FIELD_NUMBER: _ClassVar[int]
    step: int
    wall_time: float
    present: bytes
    l2_norm: bytes
    nan_count: bytes
    inf_count: bytes
    rewound: bool
    def __init__(self, step: _Optional[int] = ..., wall_time: _Optional[float] = ..., present: _Optional[bytes] = ..., l2_norm: _Optional[bytes] = ..., nan_count: _Optional[bytes] = ..., inf_count: _Optional[bytes] = ..., rewound: _Optional[bool] = ...) -> None: ...

class ReportBatch(_message.Message):
    __slots__ = ("session_id", "sequence", "steps", "dropped_steps", "final", "diagnoses", "moving")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_STEPS_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    DIAGNOSES_FIELD_NUMBER: _ClassVar[int]
    MOVING_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    sequence: int
    steps: _containers.RepeatedCompositeFieldContainer[StepReport]
    dropped_steps: int
    final: bool
    diagnoses: _containers.RepeatedCompositeFieldContainer[Diagnosis]
    moving: bool
    def __init__(self, session_id: _Optional[str] = ..., sequence: _Optional[int] = ..., steps: _Optional[_Iterable[_Union[StepReport, _Mapping]]] = ..., dropped_steps: _Optional[int] = ..., final: _Optional[bool] = ..., diagnoses: _Optional[_Iterable[_Union[Diagnosis, _Mapping]]] = ..., moving: _Optional[bool] = ...) -> None: ...

class Diagnosis(_message.Message):
    __slots__ = ("variable_id", "cause", "op_name", "op_type", "source_file", "source_line", "reason", "hint", "message")
    class Cause(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        CAUSE_UNSPECIFIED: _ClassVar[Diagnosis.Cause]
        UNUSED: _ClassVar[Diagnosis.Cause]
        NOT_ON_LOSS_PATH: _ClassVar[Diagnosis.Cause]
        BROKEN_AT_OP: _ClassVar[Diagnosis.Cause]
        LEFT_TENSORFLOW: _ClassVar[Diagnosis.Cause]
        OUTSIDE_TAPE: _ClassVar[Diagnosis.Cause]
        UNKNOWN: _ClassVar[Diagnosis.Cause]
        NOT_TRACKED: _ClassVar[Diagnosis.Cause]
        CLEARED: _ClassVar[Diagnosis.Cause]
    CAUSE_UNSPECIFIED: Diagnosis.Cause
    UNUSED: Diagnosis.Cause
    NOT_ON_LOSS_PATH: Diagnosis.Cause
    BROKEN_AT_OP: Diagnosis.Cause
    LEFT_TENSORFLOW: Diagnosis.Cause
    OUTSIDE_TAPE: Diagnosis.Cause
    UNKNOWN: Diagnosis.Cause
    NOT_TRACKED: Diagnosis.Cause
    CLEARED: Diagnosis.Cause
    VARIABLE_ID_FIELD_NUMBER: _ClassVar[int]
    CAUSE_FIELD_NUMBER: _ClassVar[int]
    OP_NAME_FIELD_NUMBER: _ClassVar[int]
    OP_TYPE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FILE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_LINE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    HINT_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    variable_id: int
    cause: Diagnosis.Cause
    op_name: str
    op_type: str
    source_file: str
    source_line: int
    reason: str
    hint: str
    message: str
    def __init__(self, variable_id: _Optional[int] = ..., cause: _Optional[_Union[Diagnosis.Cause, str]] = ..., op_name: _Optional[str] = ..., op_type: _Optional[str] = ..., source_file: _Optional[str] = ..., source_line: _Optional[int] = ..., reason: _Optional[str] = ..., hint: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("session_id", "sequence")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    sequence: int
    def __init__(self, session_id: _Optional[str] = ..., sequence: _Optional[int] = ...) -> None: ...
