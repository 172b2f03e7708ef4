"""SpikeVault corpus tooling: read recordings, extract spike events, shard them, stream them."""

from .schema import DEFAULT_SCHEMA, SCHEMA_VERSION, EventSchema, SchemaMismatchError

__version__ = "0.1.0"
__all__ = ["DEFAULT_SCHEMA", "SCHEMA_VERSION", "EventSchema", "SchemaMismatchError", "__version__"]
