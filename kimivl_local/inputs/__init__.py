"""User inputs to tokens and pixels: tokenizer and chat template, images, PDFs, videos, thinking."""
