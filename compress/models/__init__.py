"""Model loaders: Hugging Face checkpoint folders now; the efficient-transformer zoo later (issue 3)."""
