# Fixtures that start real services (broker, Triton, PostgreSQL) ship with the package so users
# can import them in their own suites: see persrec/testing/.
pytest_plugins = [
    "persrec.testing.kafka",
    "persrec.testing.triton",
    "persrec.testing.postgres",
]
