"""Process configuration: one settings object and one logging set-up."""
