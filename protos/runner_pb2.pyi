import datetime

from google.protobuf import any_pb2 as _any_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from protos import kre_nats_msg_pb2 as _kre_nats_msg_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Delivery(_message.Message):
    __slots__ = ("id", "message", "subject", "stream_sequence", "attempt", "headers")
    class HeadersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    STREAM_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    id: int
    message: _kre_nats_msg_pb2.KreNatsMessage
    subject: str
    stream_sequence: int
    attempt: int
    headers: _containers.ScalarMap[str, str]
    def __init__(self, id: _Optional[int] = ..., message: _Optional[_Union[_kre_nats_msg_pb2.KreNatsMessage, _Mapping]] = ..., subject: _Optional[str] = ..., stream_sequence: _Optional[int] = ..., attempt: _Optional[int] = ..., headers: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Failure(_message.Message):
    __slots__ = ("message", "type", "retryable", "traceback")
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    RETRYABLE_FIELD_NUMBER: _ClassVar[int]
    TRACEBACK_FIELD_NUMBER: _ClassVar[int]
    message: str
    type: str
    retryable: bool
    traceback: str
    def __init__(self, message: _Optional[str] = ..., type: _Optional[str] = ..., retryable: _Optional[bool] = ..., traceback: _Optional[str] = ...) -> None: ...

class Result(_message.Message):
    __slots__ = ("payload", "failure", "start", "end", "early_exit")
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    EARLY_EXIT_FIELD_NUMBER: _ClassVar[int]
    payload: _any_pb2.Any
    failure: Failure
    start: _timestamp_pb2.Timestamp
    end: _timestamp_pb2.Timestamp
    early_exit: bool
    def __init__(self, payload: _Optional[_Union[_any_pb2.Any, _Mapping]] = ..., failure: _Optional[_Union[Failure, _Mapping]] = ..., start: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., early_exit: _Optional[bool] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("delivery_id", "early_reply", "result")
    DELIVERY_ID_FIELD_NUMBER: _ClassVar[int]
    EARLY_REPLY_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    delivery_id: int
    early_reply: _any_pb2.Any
    result: Result
    def __init__(self, delivery_id: _Optional[int] = ..., early_reply: _Optional[_Union[_any_pb2.Any, _Mapping]] = ..., result: _Optional[_Union[Result, _Mapping]] = ...) -> None: ...

class DeliveryBatch(_message.Message):
    __slots__ = ("deliveries",)
    DELIVERIES_FIELD_NUMBER: _ClassVar[int]
    deliveries: _containers.RepeatedCompositeFieldContainer[Delivery]
    def __init__(self, deliveries: _Optional[_Iterable[_Union[Delivery, _Mapping]]] = ...) -> None: ...

class EventBatch(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[Event]
    def __init__(self, events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ...) -> None: ...

class HandleReply(_message.Message):
    __slots__ = ("early_replies", "result")
    EARLY_REPLIES_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    early_replies: _containers.RepeatedCompositeFieldContainer[_any_pb2.Any]
    result: Result
    def __init__(self, early_replies: _Optional[_Iterable[_Union[_any_pb2.Any, _Mapping]]] = ..., result: _Optional[_Union[Result, _Mapping]] = ...) -> None: ...
