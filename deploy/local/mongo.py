"""A MongoDB wire-protocol server on 127.0.0.1 for the tests and the demo, no Docker.

No ``mongod`` can be installed here, so this runs ``nx-27017`` (PyPI), a MongoDB
wire-protocol server on SQLite, as a subprocess. What it does not cover (auth,
unknown commands answered with ok) is written down in docs/stores.md.
"""

from __future__ import annotations

from pymongo import MongoClient
from pymongo.errors import PyMongoError

from deploy.local.procs import venv_bin
from deploy.local.server import LocalServer


class MongoServer(LocalServer):
    """``with MongoServer() as mongo:`` starts nx-27017; ``mongo.uri`` is where to connect."""

    name = "nx-27017"

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/"

    def command(self) -> list[str]:
        try:
            binary = venv_bin("nx-27017")
        except FileNotFoundError:
            raise FileNotFoundError(
                "nx-27017 is not installed in this venv: .venv/bin/pip install nx-27017"
            ) from None
        return [
            binary,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--data-dir",
            str(self.data_dir),
            "--log-file",
            str(self.log_path),
            "--pid-file",
            str(self.base / "nx-27017.pid"),
        ]

    def answers(self) -> bool:
        client: MongoClient[dict[str, object]] = MongoClient(
            self.uri, serverSelectionTimeoutMS=300, connectTimeoutMS=300, timeoutMS=1000
        )
        try:
            client.admin.command("ping")
            return True
        except PyMongoError:
            return False
        finally:
            client.close()
