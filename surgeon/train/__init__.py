"""Adapter training: the loop, data, several processes, devices, torch.compile and memory measurement."""
