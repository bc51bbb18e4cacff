"""kre-py's node runner, re-created as a separate process for the mixed-workflow e2e test.

    KRT_NODE_NAME=nodeA KRT_NATS_INPUT=... python -m tests.e2e.kre_py_node

Which kre-py: konstellation-io/kre-runners, kre-py/src, in the release line that stops a
workflow by publishing errors to KRT_NATS_ENTRYPOINT_SUBJECT and has `ctx.early_exit()`
(2022): main.py with `get_output_subject(request_msg.early_exit)`, a push consumer with
`DeliverPolicy.NEW`, `ack_wait = 22 * 3600` and `manual_ack=True`, `msg.ack()` right after
the handler; config.py reading KRT_IS_LAST_NODE; context.py with `early_exit()`;
compression.py at 34926f4 (gzip level 9 above 1 MiB); the Pipfile pins nats-py 2.1.0 and
protobuf 3.20.1, and the image runs Python 3.9. kre-go of the same release follows the
same message path.

Kept as kre-py has it: the mandatory variables and their error; the handler file at
KRT_BASE_PATH/KRT_HANDLER_PATH, its folder appended to sys.path, `handler` required and
awaited, `init` optional; the durable and queue `<KRT_VERSION>-<KRT_NODE_NAME>`; one
message at a time (nats-py runs a subscription's callback serially); the request parsed
outside the try; `start = datetime.utcnow()`; the ack before the elapsed times; the
tracking entry `start.isoformat()` / `end.isoformat()`, naive; `save_elapsed_time`'s
`start - datetime.fromisoformat(prev.end)`; the last-node rule; the response built afresh
(early_exit and error are not carried over); outputs gzipped above 1 MiB and refused when
still over it; publish failures only logged; the error path (`msg.ack()`, "error executing
handler", an envelope holding only `error` sent to the entrypoint); `gc.collect()` after
each message.

The error path's ack matters. When the handler returned but something after its ack
raised (a tracking time kre-py cannot parse, an output too large), nats-py raises
MsgAlreadyAckdError from that ack: the failure leaves the callback for nats-py's error
callback ("nats: encountered error"), "error executing handler" is never logged, and the
entrypoint gets nothing. That is how a `Z` in a previous node's tracking time broke KRE.

Left out: MongoDB (`ctx.db`, and the Mongo client made at connect) and predictions
(`ctx.prediction`): both raise when used. InfluxDB: `ctx.measurement.save` writes each
point as one JSON line on stdout ({"measurement", "fields", "tags"}, with the `version`
tag ContextMeasurement adds) for the test to read; logs go to stderr as kre-py's
`logging.basicConfig` sends them. Later versions' KRT_NATS_INPUTS and key-value stores.

Bridged, with what differs from kre-py's pins:
- Python 3.11 parses more in `datetime.fromisoformat` than 3.9 (a `Z`, any fraction
  length, the basic format). `fromisoformat_py39` refuses, with ValueError, the strings
  3.9 refuses, and leaves the parsing and the arithmetic to `fromisoformat` itself.
- kre-py starts `connect()` and `process_messages()` as two futures on
  `get_event_loop()` + `run_forever()` and counts on the connection coming first; here
  one coroutine connects, then subscribes, under `asyncio.run` (3.11 deprecates
  `get_event_loop()` with no running loop).
- nats-py 2.16 takes the same keywords as 2.1.0 for `js.subscribe`, `js.publish` and
  `msg.ack`, and keeps 2.1.0's MsgAlreadyAckdError on a second ack: nothing else to bridge.
- The envelope is this repository's protos/kre_nats_msg.proto: the same field numbers;
  kre-py's generated module of that release names field 3 `request_id`, this one `reply`.
"""

from __future__ import annotations

import asyncio
import copy
import gc
import gzip
import importlib.util
import inspect
import json
import logging
import os
import re
import sys
import time
import traceback
from datetime import datetime
from typing import Any

import nats
from nats.errors import ConnectionClosedError, TimeoutError
from nats.js.api import ConsumerConfig, DeliverPolicy

from protos.kre_nats_msg_pb2 import KreNatsMessage

MESSAGE_THRESHOLD = 1024 * 1024  # NATS' default max_payload
COMPRESS_LEVEL = 9
GZIP_HEADER = b"\x1f\x8b"

# The forms Python 3.9's datetime.fromisoformat accepts: YYYY-MM-DD, then any one
# separator, HH[:MM[:SS[.fff|.ffffff]]] and an optional +/-HH:MM[:SS[.ffffff]].
_PY39_TIME = r"[0-9]{2}(?::[0-9]{2}(?::[0-9]{2}(?:\.(?:[0-9]{3}|[0-9]{6}))?)?)?"
_PY39_OFFSET = r"[+-][0-9]{2}:[0-9]{2}(?::[0-9]{2}(?:\.[0-9]{6})?)?"
_PY39_ISOFORMAT = re.compile(
    rf"[0-9]{{4}}-[0-9]{{2}}-[0-9]{{2}}(?:.{_PY39_TIME}(?:{_PY39_OFFSET})?)?", re.DOTALL
)


class Config:
    def __init__(self) -> None:
        try:
            self.krt_workflow_name = os.environ["KRT_WORKFLOW_NAME"]
            self.krt_runtime_id = os.environ["KRT_RUNTIME_ID"]
            self.krt_version_id = os.environ["KRT_VERSION_ID"]
            self.krt_version = os.environ["KRT_VERSION"]
            self.krt_node_name = os.environ["KRT_NODE_NAME"]
            self.nats_server = os.environ["KRT_NATS_SERVER"]
            self.nats_input = os.environ["KRT_NATS_INPUT"]
            self.nats_output = os.environ["KRT_NATS_OUTPUT"]
            self.nats_stream = os.environ["KRT_NATS_STREAM"]
            self.nats_mongo_writer = os.environ["KRT_NATS_MONGO_WRITER"]
            self.base_path = os.environ["KRT_BASE_PATH"]
            self.handler_path = os.environ["KRT_HANDLER_PATH"]
            self.mongo_data_db_name = "data"
            self.mongo_uri = os.environ["KRT_MONGO_URI"]
            self.influx_uri = os.environ["KRT_INFLUX_URI"]
            self.krt_last_node = os.environ["KRT_IS_LAST_NODE"]
            self.nats_entrypoint_subject = os.environ["KRT_NATS_ENTRYPOINT_SUBJECT"]
        except KeyError as err:
            raise Exception(f"error reading config: the {err} env var is missing") from None


def fromisoformat_py39(value: str) -> datetime:
    """`datetime.fromisoformat` as kre-py's Python 3.9 has it: ValueError where 3.9 fails."""
    if not _PY39_ISOFORMAT.fullmatch(value):
        raise ValueError(f"Invalid isoformat string: {value!r}")
    return datetime.fromisoformat(value)


def is_compressed(data: bytes) -> bool:
    return data.startswith(GZIP_HEADER)


def size_in_kb(data: bytes) -> str:
    return f"{len(data) / 1024:.2f} KB"


def compress_if_needed(data: bytes, logger: logging.Logger) -> bytes:
    if len(data) <= MESSAGE_THRESHOLD:
        return data
    out = gzip.compress(data, compresslevel=COMPRESS_LEVEL)
    if len(out) > MESSAGE_THRESHOLD:
        raise Exception(
            f"compressed message {size_in_kb(out)} exceeds maximum size allowed of "
            f"{MESSAGE_THRESHOLD / 1024:.2f} KB."
        )
    logger.info("Original message size: %s. Compressed: %s", size_in_kb(data), size_in_kb(out))
    return out


class MeasurementRecorder:
    """ctx.measurement without InfluxDB: each point is one JSON line on stdout."""

    def __init__(self, config: Config) -> None:
        self.__config__ = config

    def save(
        self,
        measurement: str,
        fields: dict[str, Any],
        tags: dict[str, str],
        time: datetime | None = None,
        precision: str = "ns",
    ) -> None:
        point_tags = {**tags, "version": self.__config__.krt_version}
        line = {"measurement": measurement, "fields": fields, "tags": point_tags}
        print(json.dumps(line), flush=True)


class _LeftOut:
    def __init__(self, what: str) -> None:
        self._what = what

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(f"{self._what} is not part of this kre-py stand-in")


class HandlerContext:
    def __init__(self, config: Config, logger: logging.Logger, early_reply_func: Any) -> None:
        self.__data__ = lambda: None
        self.__config__ = config
        self.__early_reply__ = early_reply_func
        self.__request_msg__: KreNatsMessage | None = None
        self.logger = logger
        self.prediction = _LeftOut("ctx.prediction (MongoDB)")
        self.measurement = MeasurementRecorder(config)
        self.db = _LeftOut("ctx.db (MongoDB)")

    def path(self, relative_path: str) -> str:
        return os.path.join(self.__config__.base_path, relative_path)

    def set(self, key: str, value: Any) -> None:
        setattr(self.__data__, key, value)

    def get(self, key: str) -> Any:
        return getattr(self.__data__, key)

    async def early_reply(self, response: Any) -> None:
        request_msg = self.__request_msg__
        if request_msg.replied:  # type: ignore[union-attr]
            raise Exception("error the message was replied previously")
        request_msg.replied = True  # type: ignore[union-attr]
        await self.__early_reply__(response, request_msg.reply)  # type: ignore[union-attr]

    def early_exit(self) -> None:
        self.__request_msg__.early_exit = True  # type: ignore[union-attr]


class NodeRunner:
    def __init__(self) -> None:
        self.config = Config()
        self.runner_name = f"{self.config.krt_version}-{self.config.krt_node_name}"
        self.logger = logging.getLogger(self.runner_name)
        self.nc = nats.NATS()
        self.js = self.nc.jetstream()
        self.subscription_sid: Any = None
        self.handler_ctx: HandlerContext | None = None
        self.handler_init_fn: Any = None
        self.handler_fn: Any = None
        self.load_handler()

    def load_handler(self) -> None:
        self.logger.info(f"Loading handler script {self.config.handler_path}...")
        handler_full_path = os.path.join(self.config.base_path, self.config.handler_path)
        sys.path.append(os.path.dirname(handler_full_path))
        try:
            spec = importlib.util.spec_from_file_location("worker", handler_full_path)
            handler_module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
            spec.loader.exec_module(handler_module)  # type: ignore[union-attr]
        except Exception as err:
            tb = traceback.format_exc()
            self.logger.error(
                f"Error loading handler script {self.config.handler_path}: {err}\n\n{tb}"
            )
            sys.exit(1)
        if not hasattr(handler_module, "handler"):
            raise Exception(
                f"Handler module '{handler_full_path}' must implement a function "
                f"'handler(ctx, data)'"
            )
        self.handler_init_fn = getattr(handler_module, "init", None)
        self.handler_fn = handler_module.handler
        self.logger.info(f"Handler script was loaded from '{handler_full_path}'")

    async def run(self) -> None:
        await self.connect()
        await self.process_messages()
        await asyncio.Event().wait()  # kre-py's run_forever: until the process is killed

    async def connect(self) -> None:
        self.logger.info(f"Connecting to NATS {self.config.nats_server}...")
        await self.nc.connect(self.config.nats_server, name=self.runner_name)

    async def execute_handler_init(self) -> None:
        self.logger.info("Creating handler context...")
        self.handler_ctx = HandlerContext(self.config, self.logger, self.early_reply)
        if not self.handler_init_fn:
            return
        self.logger.info("Executing handler init...")
        if inspect.iscoroutinefunction(self.handler_init_fn):
            await asyncio.create_task(self.handler_init_fn(self.handler_ctx))
        else:
            self.handler_init_fn(self.handler_ctx)

    async def process_messages(self) -> None:
        queue_name = f"queue_{self.config.nats_input}"
        try:
            self.subscription_sid = await self.js.subscribe(
                stream=self.config.nats_stream,
                subject=self.config.nats_input,
                queue=self.runner_name,
                durable=self.runner_name,
                cb=self.message_cb,
                config=ConsumerConfig(deliver_policy=DeliverPolicy.NEW, ack_wait=22 * 3600),
                manual_ack=True,
            )
        except Exception as err:
            tb = traceback.format_exc()
            self.logger.error(
                f"Error subscribing to stream {self.config.handler_path}: {err}\n\n{tb}"
            )
            sys.exit(1)
        self.logger.info(
            f"Listening to '{self.config.nats_input}' subject with queue '{queue_name}' "
            f"from stream '{self.config.nats_stream}'"
        )
        await self.execute_handler_init()

    async def message_cb(self, msg: Any) -> None:
        start = datetime.utcnow()
        request_msg = self.new_request_msg(msg.data)
        self.logger.info(f"Received new request message from NATS subject {msg.subject}")
        try:
            ctx = copy.copy(self.handler_ctx)
            ctx.__request_msg__ = request_msg  # type: ignore[union-attr]
            handler_result = await self.handler_fn(ctx, request_msg.payload)
            await msg.ack()
            end = datetime.utcnow()

            self.save_elapsed_time(request_msg, start, end)

            if self.config.krt_last_node == "true" and request_msg.replied:
                if handler_result is not None:
                    self.logger.info(
                        "ignoring the last node response because the message was replied previously"
                    )
                return

            res = self.new_response_msg(request_msg, handler_result, start, end)
            output_subject = self.get_output_subject(request_msg.early_exit)
            await self.publish_response(output_subject, res)
        except Exception as err:
            # Raises MsgAlreadyAckdError when the handler had returned: see the module doc.
            await msg.ack()
            tb = traceback.format_exc()
            self.logger.error(f"error executing handler: {err} \n\n{tb}")
            response_err = KreNatsMessage()
            response_err.error = f"error in '{self.config.krt_node_name}': {err!s}"
            await self.js.publish(
                stream=self.config.nats_stream,
                subject=self.config.nats_entrypoint_subject,
                payload=response_err.SerializeToString(),
            )
        gc.collect()

    def get_output_subject(self, early_exit: bool) -> str:
        if early_exit:
            self.logger.info("Early exit recieved, worklow has stopped execution")
            return self.config.nats_entrypoint_subject
        return self.config.nats_output

    @staticmethod
    def new_request_msg(data: bytes) -> KreNatsMessage:
        if is_compressed(data):
            data = gzip.decompress(data)
        request_msg = KreNatsMessage()
        request_msg.ParseFromString(data)
        return request_msg

    def new_response_msg(
        self, request_msg: KreNatsMessage, payload: Any, start: datetime, end: datetime
    ) -> KreNatsMessage:
        res = KreNatsMessage()
        res.replied = request_msg.replied
        res.reply = request_msg.reply  # kre-py's `request_id`: the same field 3
        res.tracking_id = request_msg.tracking_id
        res.tracking.extend(request_msg.tracking)
        res.payload.Pack(payload)
        t = res.tracking.add()
        t.node_name = self.config.krt_node_name
        t.start = start.isoformat()
        t.end = end.isoformat()
        return res

    async def publish_response(self, subject: str, response_msg: KreNatsMessage) -> None:
        # Outside the try, as in kre-py: an output too large even gzipped takes the
        # message's error path.
        data = compress_if_needed(response_msg.SerializeToString(), logger=self.logger)
        try:
            await self.js.publish(stream=self.config.nats_stream, subject=subject, payload=data)
            self.logger.info(
                f"Published response to NATS subject {subject} "
                f"from stream {self.config.nats_stream}"
            )
        except ConnectionClosedError as err:
            self.logger.error(f"Connection closed when publishing response: {err}")
        except TimeoutError as err:
            self.logger.error(f"Timeout when publishing response: {err}")
        except Exception as err:
            self.logger.error(f"Error publishing response: {err}")

    async def early_reply(self, response: Any, request_id: str) -> None:
        res = KreNatsMessage()
        res.payload.Pack(response)
        res.reply = request_id
        await self.publish_response(self.config.nats_entrypoint_subject, res)

    def save_elapsed_time(self, req_msg: KreNatsMessage, start: datetime, end: datetime) -> None:
        prev = req_msg.tracking[-1]
        prev_end = fromisoformat_py39(prev.end)
        elapsed = end - start
        waiting = start - prev_end  # naive minus whatever the previous node wrote
        tags = {
            "workflow": self.config.krt_workflow_name,
            "version": self.config.krt_version,
            "node": self.config.krt_node_name,
        }
        fields = {
            "tracking_id": req_msg.tracking_id,
            "node_from": prev.node_name,
            "elapsed_ms": elapsed.total_seconds() * 1000,
            "waiting_ms": waiting.total_seconds() * 1000,
        }
        self.handler_ctx.measurement.save("node_elapsed_time", fields, tags)  # type: ignore[union-attr]

        if self.config.krt_last_node == "true":
            entrypoint_start = fromisoformat_py39(req_msg.tracking[0].start)
            elapsed_ms = (end - entrypoint_start).total_seconds() * 1000
            tags = {"workflow": self.config.krt_workflow_name, "version": self.config.krt_version}
            fields = {"elapsed_ms": elapsed_ms, "tracking_id": req_msg.tracking_id}
            self.handler_ctx.measurement.save("workflow_elapsed_time", fields, tags)  # type: ignore[union-attr]


def configure_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s.%(msecs)03dZ %(levelname)s %(message)s",
        datefmt="%Y-%m-%dT%H:%M:%S",
    )
    logging.Formatter.converter = time.gmtime
    logging.addLevelName(logging.WARNING, "WARN")
    logging.addLevelName(logging.CRITICAL, "ERROR")


def main() -> None:
    configure_logging()
    runner = NodeRunner()
    try:
        asyncio.run(runner.run())
    except KeyboardInterrupt:
        runner.logger.info("process interrupted")


if __name__ == "__main__":
    main()
