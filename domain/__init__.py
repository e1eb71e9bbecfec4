"""Types shared by api/, workflows/ and activities/.

Pure and sandbox-safe: no environment reads, no I/O, importable from workflow code.
"""
