"""The producer and the upstream lastseen is built for, in one box."""
