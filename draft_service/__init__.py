"""The draft service: hosts a cheap proposer (a small draft model) and proposes tokens."""
