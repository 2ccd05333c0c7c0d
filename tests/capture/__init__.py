"""pykd.capture on Hugging Face encoders."""
