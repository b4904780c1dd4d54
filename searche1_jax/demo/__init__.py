"""The embedded demo: the synthetic search world, its transcripts and tokenizer, and the warm-start policy."""
