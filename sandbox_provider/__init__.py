"""A sandbox card processor of ours that behaves like a real one (modelled on Stripe):
idempotent charges and refunds, test payment methods, and faults on demand."""
