"""A handler host without stores does not load their drivers (about 20 MB of memory)."""

from __future__ import annotations

import subprocess
import sys

from influxdb_client.domain.write_precision import WritePrecision

from handler_host.services import influx

DRIVERS = ("pymongo", "bson", "influxdb_client")


def test_the_host_without_stores_imports_no_driver() -> None:
    code = (
        "import sys\n"
        "from handler_host import main, server, context\n"
        "from handler_host.services import Services, ServiceSettings\n"
        "settings = ServiceSettings.from_env({})\n"
        "Services.from_settings(settings, 'v-id', 'v1', 'wf', 'node')\n"
        f"print(sorted(m for m in {DRIVERS!r} if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]", out.stderr


def test_mongo_store_names_still_import_from_services() -> None:
    from handler_host.services import MongoStore, PredictionStore
    from handler_host.services.mongo import MongoStore as Direct

    assert MongoStore is Direct
    assert PredictionStore.__name__ == "PredictionStore"


def test_precisions_are_influxdb_clients() -> None:
    assert (influx.PRECISION_S, influx.PRECISION_MS, influx.PRECISION_US, influx.PRECISION_NS) == (
        WritePrecision.S,
        WritePrecision.MS,
        WritePrecision.US,
        WritePrecision.NS,
    )
