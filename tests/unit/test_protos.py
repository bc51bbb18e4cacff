"""Generated code stays generated: the checked-in files match their .proto sources."""

from protos.generate import stale_files


def test_generated_code_is_fresh():
    stale = stale_files()
    assert not stale, f"stale generated files, run `make protos`: {stale}"
