"""Reading and writing models: checkpoints, artifacts in every format, the Hugging Face Hub, exports."""
