"""The HTTP API: thin routes over the payment workflow and the ledger."""
