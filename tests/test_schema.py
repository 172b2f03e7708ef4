import numpy as np
import pytest

from spikevault.schema import (
    DEFAULT_SCHEMA,
    EventSchema,
    SchemaMismatchError,
    concat_blocks,
    slice_block,
)


def _block(schema, n, seed=0):
    rng = np.random.default_rng(seed)
    block = {}
    for name, (dt, shape) in schema.array_fields().items():
        block[name] = rng.normal(size=(n, *shape)).astype(dt) if dt.kind == "f" else np.zeros((n, *shape), dt)
    for name in schema.string_fields():
        block[name] = np.array([f"{name}{i}" for i in range(n)])
    return block


def test_default_schema_geometry():
    s = DEFAULT_SCHEMA
    assert (s.num_samples, s.num_channels, s.nbefore) == (60, 12, 24)
    assert s.array_fields()["waveform"] == (np.dtype("float16"), (60, 12))


def test_round_trip_and_version_check():
    s = EventSchema(num_channels=4)
    assert EventSchema.from_dict(s.to_dict()) == s
    d = s.to_dict() | {"version": 99}
    with pytest.raises(SchemaMismatchError, match="version 99"):
        EventSchema.from_dict(d)
    d = s.to_dict() | {"num_samples": 61}
    with pytest.raises(SchemaMismatchError, match="num_samples"):
        EventSchema.from_dict(d)


def test_check_compatible_names_each_difference():
    a = DEFAULT_SCHEMA
    b = EventSchema(sampling_rate_hz=20_000.0, num_channels=8)
    with pytest.raises(SchemaMismatchError) as err:
        a.check_compatible(b, what="corpus x")
    msg = str(err.value)
    assert "corpus x" in msg and "sampling_rate_hz=20000.0" in msg and "num_channels=8" in msg
    a.check_compatible(EventSchema())


def test_validate_concat_slice():
    s = EventSchema(num_channels=4)
    b1, b2 = _block(s, 3, 0), _block(s, 5, 1)
    assert s.validate_block(b1) == 3
    both = concat_blocks([b1, b2], s)
    assert s.validate_block(both) == 8
    np.testing.assert_array_equal(slice_block(both, slice(3, 8))["waveform"], b2["waveform"])
    assert s.validate_block(concat_blocks([], s)) == 0
    bad = dict(b1, waveform=b1["waveform"].astype(np.float32))
    with pytest.raises(SchemaMismatchError, match="waveform: dtype float32"):
        s.validate_block(bad)
    with pytest.raises(SchemaMismatchError, match="missing fields"):
        s.validate_block({k: v for k, v in b1.items() if k != "probe"})
