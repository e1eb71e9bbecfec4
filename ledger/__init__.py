"""The PostgreSQL ledger: tables, repositories (which never commit) and migrations."""
