"""The committed stubs are what the .proto files generate."""

from specserve.protogen import stale_stubs


def test_generated_stubs_are_up_to_date():
    assert stale_stubs() == [], "run `make protos` and commit the result"
