"""The inference core: everything `process.py` and the container run, and nothing from training or simulation
(tests/test_layout.py enforces that boundary)."""
