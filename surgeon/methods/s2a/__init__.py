"""S2A memory methods: exact forward, low-bit tensors kept for backward."""
