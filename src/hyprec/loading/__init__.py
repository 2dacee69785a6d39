"""Reading model directories: weights, tokenizer, sentence-transformers pipeline files."""
