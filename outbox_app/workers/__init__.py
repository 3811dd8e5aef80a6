"""The workers: produce new facts (OCR text, vectors) and write them back through the outbox."""
