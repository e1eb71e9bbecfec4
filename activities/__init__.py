"""All I/O of a payment: provider, ledger, webhooks. Each activity is idempotent."""
