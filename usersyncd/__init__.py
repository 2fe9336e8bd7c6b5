"""usersyncd: keeps a subscriber API in sync with a PostgreSQL users table, under a hard quota."""

__version__ = "0.1.0"
