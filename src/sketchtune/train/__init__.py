"""Fine-tuning sketched models: only the codebooks train (codes stay frozen), through Hugging Face Trainer."""
