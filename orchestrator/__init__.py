"""The orchestrator: owns each request, drives target and draft sessions, streams text."""
