"""Model families, one file each, mirroring Hugging Face module and weight names."""
