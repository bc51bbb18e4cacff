"""The second node of the demo workflow: it uses the three data services.

KRT_BASE_PATH=examples/greeter KRT_HANDLER_PATH=recorder.py, with KRT_MONGO_URI and
KRT_INFLUX_URI set. It takes the greeter's Response, keeps it in MongoDB, records a
prediction (which language the greeting is in) and a measurement, and passes the
Response on to the next node.
"""

from datetime import UTC, datetime

from public_input_pb2 import Response

LANGUAGES = {"Hello": "en", "Hola": "es", "Bonjour": "fr"}


async def handler(ctx, data):
    res = Response()
    data.Unpack(res)

    await ctx.db.save(
        "greetings",
        {"tracking_id": ctx.tracking_id, "greeting": res.greeting, "at": datetime.now(UTC)},
    )
    language = LANGUAGES.get(res.greeting.split(",")[0], "unknown")
    await ctx.prediction.save(
        predicted_value=language, true_value="en", extra={"greeting": res.greeting}
    )
    ctx.measurement.save(
        "greetings", fields={"length": len(res.greeting)}, tags={"language": language}
    )  # not awaited: batched in the background
    return res
