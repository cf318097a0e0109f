"""Storage: Piccolo tables, migrations, the repository and key encryption."""
