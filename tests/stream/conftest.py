"""Pipeline fixtures (worker_settings, start_worker) live in tests/conftest.py, shared with tests/reliability."""
