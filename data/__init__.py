"""Data: image folders, class names, CLIP prompt templates, views for the tokenizer."""
