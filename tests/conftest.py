pytest_plugins = ["tests.fixtures.databases", "tests.fixtures.gateway", "tests.fixtures.redis"]
