"""What lives in `state/`: the SQLite store, the state machines it enforces, and the
vector segment files."""
