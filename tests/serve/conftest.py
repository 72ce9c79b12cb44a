"""PostgreSQL for tests/serve: one throwaway server per test session (``postgres_url``), and a fresh,
empty database on it per test (``pg_database``). See postgres.py for how the server is found or installed."""

import secrets

import pytest
from postgres import start_postgres


@pytest.fixture(scope="session")
def postgres_url():
    url, stop = start_postgres()
    try:
        yield url
    finally:
        stop()


@pytest.fixture
def pg_database(postgres_url):
    """The URL of a new, empty database on the test server."""
    import psycopg

    name = f"veil_{secrets.token_hex(6)}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return postgres_url.rsplit("/", 1)[0] + "/" + name
