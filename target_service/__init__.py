"""The target service: hosts the large model and verifies proposals."""
